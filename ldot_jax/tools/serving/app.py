"""The search service: a Retriever behind HTTP (Starlette on uvicorn), its queries batched.

    service = Service(Retriever.from_dirs("models/clip", "galleries/photos"))
    service.warmup()                       # compiles every batch shape: none after this
    serve(service, "127.0.0.1", 8080)      # until SIGINT / SIGTERM; in-flight requests finish

Starlette, not FastAPI: the service needs routing, JSON, a page and a lifespan, and nothing of
FastAPI's pydantic models and generated schemas, which would add their install and validate a
second time what requests.py checks with messages naming the field.

  POST   /search   {"text" | "image" | "item", "k", "rerank_top", "where"} → hits, timings
  POST   /embed    {"text" | "image"} → vectors
  POST   /items    {"items": [{"key", "image", "name"?, "fields"?}]} → their ids (saved)
  DELETE /items    {"ids": [...]} or {"keys": [...]} → the ids removed (saved)
  GET    /health   the indexes' sizes and health; POST /health measures it again
  GET    /info     model fingerprint, index types and sizes, limits, versions
  GET    /metrics  Prometheus text
  GET    /         the search page; GET /items/{id}/picture a gallery item's picture
Bad requests get 400 with {"error": "<field>: …"}, a full queue 503; the service goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import time

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ldot_jax.core import paths
from ldot_jax.models import towers
from ldot_jax.retrieval import batcher as batcher_lib
from ldot_jax.retrieval import encode
from ldot_jax.tools.serving import requests
from ldot_jax.tools.serving.metrics import Metrics

log = logging.getLogger(__name__)

PAGE = os.path.join(os.path.dirname(__file__), "page.html")
VERSIONS = ("ldot_jax", "jax", "jaxlib", "flax", "numpy", "scann", "starlette", "uvicorn")


class Service:
    """A Retriever, its batcher and metrics. limits: what one request may ask (max_queries is
    also the encoder's largest batch); max_wait_ms: how long a request waits for others to
    share its batch; max_queue: requests waiting at most (more get 503). model_dir: shown by
    /info."""

    def __init__(self, retriever, limits: requests.Limits = requests.Limits(),
                 max_wait_ms: float = 5.0, max_queue: int = 256, model_dir: str | None = None):
        self.retriever, self.limits, self.model_dir = retriever, limits, model_dir
        self.metrics = Metrics(depth=lambda: self.batcher.depth)
        self.batcher = batcher_lib.QueryBatcher(retriever, limits.max_queries, max_wait_ms,
                                                max_queue, self.metrics)
        self.compiled_after_warmup = None

    def warmup(self) -> int:
        """Compiles the encoders for every batch shape (and the re-ranker for every text
        bucket); returns the encoder programs compiled."""
        self.compiled_after_warmup = self.batcher.warmup()
        if hasattr(self.retriever.reranker, "warmup"):
            self.retriever.reranker.warmup()
        return self.compiled_after_warmup

    @property
    def added_dir(self) -> str | None:
        """Where the pictures / regions of items added through the API are kept (beside the
        image index, so the re-ranker and the page read them as the gallery's own)."""
        index_dir = self.retriever.index_dirs.get("image")
        if index_dir is None or paths.is_remote(index_dir):
            return None
        return os.path.join(os.path.dirname(os.path.abspath(index_dir)), "added")

    def close(self) -> None:
        self.batcher.close()

    def check_health(self) -> dict:
        """Recall against exact search of each index that keeps its vectors (the others say
        why they cannot be measured here)."""
        out = {}
        for side, index in self.retriever.indexes.items():
            if index is None:
                continue
            if index.vectors_of(index.ids[:1]) is None:
                out[side] = {"measured": False, "why": f"the {index.type} index does not keep "
                                                       f"its vectors"}
            else:
                out[side] = self.retriever.check_health(side)
        return out

    def info(self) -> dict:
        r = self.retriever
        versions = {}
        for name in VERSIONS:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        return {"model": {"dir": self.model_dir, "kind": getattr(r, "kind", None),
                          "fingerprint": getattr(r, "fingerprint", None),
                          "image_input": towers.image_input_name(r.model.config)},
                "indexes": self.indexes(), "reranker": r.reranker is not None,
                "rerank_top": r.rerank_top, "limits": dataclasses.asdict(self.limits),
                "max_wait_ms": self.batcher.max_wait * 1000,
                "compiled_programs": encode.encode_batch._cache_size(),
                "compiled_after_warmup": self.compiled_after_warmup, "versions": versions}

    def indexes(self) -> dict:
        out = {}
        for side, index in self.retriever.indexes.items():
            if index is not None:
                out[side] = {"type": index.type, "size": len(index), "dim": index.dim,
                             "health": index.info.get("health"),
                             "fields": self.retriever.catalogs.get(side).fields.fields
                             if side in self.retriever.catalogs else []}
        return out


def _hits(retriever, results, target: str) -> list[list[dict]]:
    catalog = retriever.catalogs.get(target)
    key_of = catalog.key_of if catalog is not None else {}
    out = []
    for ids, scores, names in zip(results.ids, results.scores, results.names):
        row = []
        for i, score, name in zip(ids.tolist(), scores.tolist(), names):
            if i < 0:
                continue
            hit = {"id": int(i), "name": name, "score": round(float(score), 6)}
            if i in key_of:
                hit["key"] = key_of[i]
            fields = catalog.fields.fields_of(i) if catalog is not None else {}
            if fields:
                hit["fields"] = fields
            if catalog is not None and i in catalog.paths:
                hit["picture"] = f"/items/{i}/picture"
            row.append(hit)
        out.append(row)
    return out


def make_app(service: Service) -> Starlette:
    """The ASGI app of a service (its lifespan closes the batcher once requests are done)."""
    retriever, metrics = service.retriever, service.metrics

    async def run(work):
        future = service.batcher.submit(work)
        return await asyncio.wrap_future(future)

    async def answer(endpoint: str, request: Request, handle) -> Response:
        start = time.perf_counter()
        try:
            status, payload = 200, await handle(request)
        except requests.BadRequest as e:
            status, payload = 400, {"error": str(e)}
        except (batcher_lib.QueueFull, batcher_lib.Closed) as e:
            status, payload = 503, {"error": f"busy: {e}; retry later"}
        except (ValueError, KeyError) as e:  # the retriever's refusals name what was wrong
            status, payload = 400, {"error": str(e.args[0] if e.args else e)}
        except Exception as e:  # the request fails, the service goes on
            log.exception("%s failed", endpoint)
            status, payload = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels("total").observe(time.perf_counter() - start)
        return JSONResponse(payload, status)

    async def body(request: Request) -> dict:
        return requests.body_of(await request.body())

    async def search(request: Request) -> Response:
        async def handle(request):
            parsed = requests.search_request(await body(request), service.limits,
                                             retriever.model.config)
            if parsed.item is not None:
                return await search_item(parsed)
            results = await run(batcher_lib.Search(parsed.direction, parsed.queries, parsed.k,
                                                   parsed.rerank_top, parsed.where))
            return respond(parsed, results)
        return await answer("search", request, handle)

    def respond(parsed, results) -> dict:
        metrics.stages(results.timings_ms)
        target = "image" if parsed.direction == "text_to_image" else "text"
        return {"results": _hits(retriever, results, target), "timings_ms": results.timings_ms,
                "filter": results.filter}

    async def search_item(parsed) -> dict:
        image_index = retriever.indexes.get("image")
        if image_index is None:
            raise requests.BadRequest("item: no image index to take the item's vector from")
        if parsed.rerank_top:
            raise requests.BadRequest("rerank_top: an item query has no image input for the "
                                      "re-ranker (send the picture as \"image\")")

        def work():
            vector = image_index.vectors_of([parsed.item])
            if vector is None:
                raise requests.BadRequest("item: this index does not keep its vectors")
            return retriever.search_encoded("image_to_text", vector, {}, parsed.k, 0,
                                            parsed.where)
        return respond(parsed, await run(batcher_lib.Call(work)))

    async def embed(request: Request) -> Response:
        async def handle(request):
            side, queries = requests.embed_request(await body(request), service.limits,
                                                   retriever.model.config)
            vectors = await run(batcher_lib.Embed(side, queries))
            return {"vectors": np.asarray(vectors).round(7).tolist()}
        return await answer("embed", request, handle)

    async def items(request: Request) -> Response:
        async def handle(request):
            if request.method == "DELETE":
                ids, keys = requests.delete_request(await body(request))
                removed = await run(batcher_lib.Call(lambda: retriever.delete(ids, keys)))
                return {"deleted": removed.tolist()}
            new = requests.items_request(await body(request), service.limits,
                                         retriever.model.config)

            def add():
                catalog = retriever.catalogs.get("image")
                taken = [k for k in new.keys if catalog is not None and k in catalog.keys]
                if taken or len(set(new.keys)) != len(new.keys):
                    raise ValueError(f"keys already in the gallery (or repeated): "
                                     f"{(taken or new.keys)[:10]}")
                paths = None
                if service.added_dir is None and retriever.reranker is not None:
                    raise requests.BadRequest(
                        "items: this service re-ranks candidates from their files, and its "
                        "index is not on local disk to keep new items' files beside it")
                if service.added_dir is not None:
                    from ldot_jax.retrieval import gallery
                    paths = gallery.save_inputs(service.added_dir, new.keys, new.images)
                return retriever.add_images(new.images, new.names, new.keys, new.fields,
                                            paths=paths, batch=service.limits.max_queries)
            ids = await run(batcher_lib.Call(add))
            return {"ids": ids.tolist()}
        return await answer("items", request, handle)

    async def health(request: Request) -> Response:
        async def handle(request):
            measured = {}
            if request.method == "POST":
                measured = await run(batcher_lib.Call(service.check_health))
            return {"status": "ok", "indexes": service.indexes(),
                    "queue": service.batcher.depth, **({"measured": measured}
                                                       if measured else {})}
        return await answer("health", request, handle)

    async def info(request: Request) -> Response:
        async def handle(request):
            return service.info()
        return await answer("info", request, handle)

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    async def page(request: Request) -> Response:
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    async def picture(request: Request) -> Response:
        catalog = retriever.catalogs.get("image")
        try:
            item = int(request.path_params["item"])
        except ValueError:
            return JSONResponse({"error": "item: expected an integer id"}, 400)
        path = catalog.paths.get(item) if catalog is not None else None
        if not path or not os.path.isfile(path):  # only files the gallery lists
            return JSONResponse({"error": f"item {item}: no picture"}, 404)
        return FileResponse(path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # After uvicorn has finished the requests in flight: the queue is empty by now, but
        # close() would finish anything left before stopping the device thread.
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    return Starlette(routes=[
        Route("/search", search, methods=["POST"]),
        Route("/embed", embed, methods=["POST"]),
        Route("/items", items, methods=["POST", "DELETE"]),
        Route("/items/{item}/picture", picture, methods=["GET"]),
        Route("/health", health, methods=["GET", "POST"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/", page, methods=["GET"]),
    ], lifespan=lifespan)


def serve(service: Service, host: str = "127.0.0.1", port: int = 8080,
          graceful_s: float = 30.0) -> None:
    """Runs the service until SIGINT / SIGTERM; requests in flight then finish (up to
    graceful_s seconds) before the device thread stops."""
    import uvicorn
    config = uvicorn.Config(make_app(service), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=graceful_s)
    uvicorn.Server(config).run()


class Background:
    """A service on 127.0.0.1 in a thread of this process (tests, benchmarks): `port` once
    started; stop() shuts it down as SIGTERM would (requests in flight finish, then the
    lifespan closes the batcher)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 120.0):
        import threading
        import uvicorn
        config = uvicorn.Config(make_app(service), host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=30)
        self.service, self.server = service, uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="ldot-serve", daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the service did not start")
            time.sleep(0.02)
        self.host = host
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("the service did not stop")
