"""The L4 proxy: outbound (15001 and SOCKS5 15080), inbound HBONE (15008) and inbound
plaintext (15006), the byte relay between them, and the record of every live connection."""
