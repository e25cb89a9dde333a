"""HTTP inside the tunnel: protocol-neutral messages and bodies (`messages`), byte-stream
adapters (`streams`), HTTP/1.1 over h11 (`h1`), HTTP/2 and gRPC over h2 (`h2conn`), and
protocol detection (`sniff`). Server and client sides alike run over any `ByteStream`.
"""
