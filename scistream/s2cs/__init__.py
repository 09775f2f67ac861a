"""S2CS, the control server of a facility gateway: sessions, ports, credentials, proxies."""
