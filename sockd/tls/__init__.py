"""TLS on sockd's listeners and relays: the TLS files a config names, read and checked at load into
material that travels to the workers (material), the OpenSSL contexts built from it (contexts),
the facts of a certificate read without a handshake (certificates)."""
