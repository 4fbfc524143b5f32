"""``nnctl serve``: a trained run as an HTTP service (the package is ``serving``: no submodule shares a name with a
public function, and ``nnctl.serve`` is the function) (the serve extra: FastAPI, uvicorn, prometheus-client,
python-multipart). Imported only by ``nnctl.api.serve``, never on ``import nnctl`` or ``nnctl --help``.

    app.py        the app: POST /predict as plain ASGI (the hot path), the other endpoints FastAPI's, refusals,
                  the drain on shutdown (ServeOptions)
    reading.py    a request's query, JSON tensors and multipart images, read and checked (in the pool)
    batcher.py    the one inference worker: dynamic batches under torch.inference_mode
    metrics.py    /metrics (prometheus-client)
    page.py       the HTML page at /
    lifecycle.py  bind the port, load once, uvicorn with its timeouts, the graceful drain
"""

# the packages the serve extra installs, by import name (nnctl.api.serve says which pip command adds them)
REQUIRED = ("fastapi", "uvicorn", "prometheus_client", "multipart")
