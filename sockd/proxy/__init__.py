"""The PROXY protocol (HAProxy's doc/proxy-protocol.txt): the header a load balancer puts before
a client's bytes to say who the client is, read by a listener with `proxy_protocol` (a stage of
the connection's life, see sockd.lifecycle) and written by a relay with
`upstream_proxy_protocol`. What both sides share, the wire format's constants, is in
sockd.proxy.wire."""
