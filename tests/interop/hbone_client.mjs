// An independent HBONE client: Node.js http2 (nghttp2 inside) over mutual TLS.
// Usage: node hbone_client.mjs '<json>' with {host, port, ca, cert?, key?, method, authority,
// size, maxVersion?}. Sends `size` random bytes on the CONNECT stream, half-closes, reads the
// answer to its end, and prints one JSON line: status, TLS protocol, ALPN, the server's SANs,
// SHA-256 of what was sent and of what came back, or `error`.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http2 from 'node:http2';

const cfg = JSON.parse(process.argv[2]);
const out = { sent: 0, received: 0 };
let done = false;

function finish(code) {
  if (done) return;
  done = true;
  process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(code));
}

setTimeout(() => { out.error = out.error || 'timeout'; finish(1); }, cfg.timeoutMs || 20000);

const opts = {
  ca: fs.readFileSync(cfg.ca),
  ALPNProtocols: ['h2'],
  // WIRE.md: no SNI; the identity check is SPIFFE, not DNS: report the SANs instead.
  servername: '',
  checkServerIdentity: () => undefined,
};
if (cfg.cert) opts.cert = fs.readFileSync(cfg.cert);
if (cfg.key) opts.key = fs.readFileSync(cfg.key);
if (cfg.maxVersion) opts.maxVersion = cfg.maxVersion;

const client = http2.connect(`https://${cfg.host}:${cfg.port}`, opts);
client.on('error', (e) => { out.error = String(e.code || e.message); finish(1); });
client.on('connect', (_session, socket) => {
  out.protocol = socket.getProtocol();
  out.alpn = socket.alpnProtocol;
  out.peerSan = socket.getPeerCertificate().subjectaltname || '';
});

const headers = cfg.method === 'CONNECT'
  ? { ':method': 'CONNECT', ':authority': cfg.authority }
  : { ':method': cfg.method, ':scheme': 'https', ':path': '/', ':authority': cfg.authority };
const req = client.request(headers, { endStream: cfg.method !== 'CONNECT' });
const recvHash = crypto.createHash('sha256');
req.on('error', (e) => { out.error = out.error || String(e.code || e.message); finish(1); });
req.on('data', (chunk) => { recvHash.update(chunk); out.received += chunk.length; });
req.on('end', () => {
  out.receivedSha256 = recvHash.digest('hex');
  client.close();
  finish(0);
});
req.on('close', () => {
  if (out.status !== 200) { client.close(); finish(0); }
});
req.on('response', (h) => {
  out.status = Number(h[':status']);
  if (out.status !== 200 || cfg.method !== 'CONNECT') return;
  const payload = crypto.randomBytes(cfg.size || 0);
  out.sentSha256 = crypto.createHash('sha256').update(payload).digest('hex');
  const chunk = 64 * 1024;
  let offset = 0;
  const pump = () => {
    while (offset < payload.length) {
      const piece = payload.subarray(offset, offset + chunk);
      offset += piece.length;
      out.sent += piece.length;
      if (!req.write(piece)) { req.once('drain', pump); return; }
    }
    req.end(); // END_STREAM: half-close, the echo answers to the end
  };
  pump();
});
