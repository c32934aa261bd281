"""The web console: an HTTP server on loopback (aiohttp, like the pageserver's API) with a
JSON API (`openapi.json`) and a plain HTML/JS UI over it (`static/`). docs/console.md.

    auth.py     the console token, the login cookie, the middleware that requires them
    jobs.py     long operations in threads, with their progress lines, polled by the UI
    metrics.py  a sampler scraping the services' /metrics into an in-memory hour
    sql.py      a read-only query on an endpoint, with a row limit
    api.py      the API's handlers (over strata.control.operations)
    server.py   the aiohttp application and `serve()` (`strata console`)
"""
