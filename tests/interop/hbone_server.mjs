// An independent HBONE server: Node.js http2 (nghttp2 inside) with mutual TLS, serving CONNECT
// by piping the stream to a TCP connection to the :authority. Anything else gets 400.
// Usage: node hbone_server.mjs '<json>' with {host, ca, cert, key}. Prints JSON lines:
// {"listening": port} first, then {"event": "session", protocol, alpn, peerSan} per client,
// and {"event": "connect", authority} per tunnel.
import fs from 'node:fs';
import http2 from 'node:http2';
import net from 'node:net';

const cfg = JSON.parse(process.argv[2]);
const log = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

const server = http2.createSecureServer({
  ca: fs.readFileSync(cfg.ca),
  cert: fs.readFileSync(cfg.cert),
  key: fs.readFileSync(cfg.key),
  requestCert: true,
  rejectUnauthorized: true,
  allowHTTP1: false,
});

server.on('secureConnection', (socket) => {
  log({
    event: 'session',
    protocol: socket.getProtocol(),
    alpn: socket.alpnProtocol,
    peerSan: socket.getPeerCertificate().subjectaltname || '',
  });
});
server.on('tlsClientError', (e) => log({ event: 'tls-error', error: String(e.code || e.message) }));

server.on('stream', (stream, headers) => {
  const authority = headers[':authority'] || '';
  if (headers[':method'] !== 'CONNECT') {
    stream.respond({ ':status': 400 }, { endStream: true });
    return;
  }
  const m = /^\[?([^\]]+)\]?:(\d+)$/.exec(authority);
  if (!m) {
    stream.respond({ ':status': 400 }, { endStream: true });
    return;
  }
  log({ event: 'connect', authority });
  const upstream = net.connect({ host: m[1], port: Number(m[2]) }, () => {
    stream.respond({ ':status': 200 });
    stream.pipe(upstream);
    upstream.pipe(stream);
  });
  upstream.on('error', () => {
    if (!stream.headersSent) stream.respond({ ':status': 503 }, { endStream: true });
    else stream.close(http2.constants.NGHTTP2_CONNECT_ERROR);
  });
  stream.on('error', () => upstream.destroy());
});

server.listen(0, cfg.host, () => log({ listening: server.address().port }));
process.on('SIGTERM', () => process.exit(0));
