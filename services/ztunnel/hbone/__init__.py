"""HBONE transport: HTTP/2 CONNECT tunnels inside mutual TLS 1.3 between ztunnels. No routing, no policy.

Modules, bottom up:

* `core`       sans-I/O `ClientCore` / `ServerCore` on h2 (bytes in, events out);
* `tls`        pyOpenSSL contexts per identity with SPIFFE verification; `tlsstream` drives them on the fd;
* `stream`     `HboneStream`, one tunnel as a half-closeable byte stream;
* `connection` `HboneConnection`: the reader, writer and pinger tasks multiplexing the streams;
* `pool`       the client side: `connect_hbone`, `open_hbone_connection`, the upstream-style pool;
* `server`     `serve_hbone_connection` for one accepted 15008 connection, asking an `InboundPolicy`
               (`serve_hbone_tunnels`: the same for a waypoint, whose handler serves each tunnel);
* `relay`      copy between an `HboneStream` and a socket, with half-close;
* `errors`     the transport's error vocabulary.

Routing (which peer, which identities) and policy (who may connect) live in `services/ztunnel/proxy/`.
"""
