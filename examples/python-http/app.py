"""Stream a table as compressed NDJSON over HTTP, straight from PostgreSQL:
COPY ... TO STDOUT (FORMAT ndjson, COMPRESSION zstd or gzip) is copied into
the response body block by block, so memory stays flat whatever the
table's size, a slow client slows the export down (backpressure), and a
client that goes away cancels the query.

    PGHOST=... PGDATABASE=... uvicorn app:app --port 8080
    curl --compressed 'http://127.0.0.1:8080/export'
    curl -H 'Accept-Encoding: gzip' 'http://127.0.0.1:8080/export' | gunzip
    curl --compressed 'http://127.0.0.1:8080/export?after=<resume_token>'

The connection comes from the usual libpq environment variables (PGHOST,
PGPORT, PGDATABASE, PGUSER, PGPASSWORD).
"""

from __future__ import annotations

import os

import anyio
import psycopg
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

SOURCE = os.environ.get("EXPORT_SOURCE", "events")
KEY = os.environ.get("EXPORT_KEY", "id")
# "javascript": bigint and numeric as strings, timestamptz in UTC, bytea as
# base64, so that JSON.parse loses nothing.
PROFILE = os.environ.get("EXPORT_PROFILE", "javascript")


def choose_encoding(header: str | None) -> str:
    """The Content-Encoding for a request's Accept-Encoding: zstd when the
    client accepts it at least as much as gzip (curl --compressed and current
    browsers list both; zstd costs the server a fraction of gzip's CPU),
    gzip otherwise, also when the header is missing."""
    q: dict[str, float] = {}
    for item in (header or "").split(","):
        name, *params = item.strip().lower().split(";")
        if not name:
            continue
        weight = next((p.strip()[2:] for p in params if p.strip().startswith("q=")), "1")
        try:
            q[name] = float(weight)
        except ValueError:
            q[name] = 0.0

    def accepts(name: str) -> float:
        return q.get(name, q.get("*", 0.0))

    return "zstd" if accepts("zstd") > 0 and accepts("zstd") >= accepts("gzip") else "gzip"


def export_statement(encoding: str, after: str | None) -> sql.Composed:
    # COPY takes no bind parameters: the identifier and the token are quoted.
    options = [sql.SQL("FORMAT ndjson"), sql.SQL(f"COMPRESSION {encoding}"),
               sql.SQL("KEY {}").format(sql.Literal(KEY)), sql.SQL("FOOTER true"),
               sql.SQL("PROFILE {}").format(sql.Literal(PROFILE))]
    if after:
        options.append(sql.SQL("AFTER {}").format(sql.Literal(after)))
    return sql.SQL("COPY {} TO STDOUT ({})").format(sql.Identifier(SOURCE), sql.SQL(", ").join(options))


async def export(request: Request) -> Response:
    conn = await psycopg.AsyncConnection.connect(autocommit=True)
    encoding = choose_encoding(request.headers.get("accept-encoding"))
    copy_cm = conn.cursor().copy(export_statement(encoding, request.query_params.get("after")))
    try:
        copy = await copy_cm.__aenter__()
        # The first block, or the error that ends the export before it (a
        # bad resume token, a missing table): that one can still be a 4xx/5xx.
        first = await copy.read()
    except psycopg.Error as exc:
        await conn.close()
        status = 400 if exc.sqlstate == "22023" else 500
        return PlainTextResponse(f"{exc.diag.message_primary}\n", status_code=status)

    async def body():
        finished = False
        try:
            yield first
            async for block in copy:
                yield block
            await copy_cm.__aexit__(None, None, None)
            finished = True
        finally:
            # Reached also when the client went away: Starlette cancels the
            # response (or closes this generator). Stop the query now and
            # drop the connection; shielded, since the scope is cancelled.
            with anyio.CancelScope(shield=True):
                if not finished:
                    await conn.cancel_safe()
                await conn.close()

    return StreamingResponse(body(), media_type="application/x-ndjson",
                             headers={"Content-Encoding": encoding, "Vary": "Accept-Encoding",
                                      "Cache-Control": "no-store"})


app = Starlette(routes=[Route("/export", export)])
