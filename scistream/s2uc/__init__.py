"""S2UC, the user client: asks S2CS servers for streams, releases them, shows them."""
