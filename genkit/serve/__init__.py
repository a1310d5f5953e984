"""`genkit serve`: an HTTP server that speaks the dialects image clients already use.

AUTOMATIC1111's `/sdapi/v1/*` and OpenAI's `/v1/images/*`, over the same engine as the CLI:
concurrent requests with the same settings are coalesced into one batch (each image keeps its
own seed, so its pixels do not depend on its batch-mates), every image is written as
`genkit generate` writes it, and a gallery page at `/` lists what was made.

    from genkit.serve import create_app
    app = create_app(["genkit-mini"], out="served/")      # an ASGI app (FastAPI); run it with uvicorn

Importing this package is cheap: FastAPI, uvicorn and torch load when an app is created.
"""

__all__ = ["create_app", "Limits"]


def __getattr__(name):
    if name == "create_app":
        from genkit.serve.app import create_app

        return create_app
    if name == "Limits":
        from genkit.serve.limits import Limits

        return Limits
    raise AttributeError(f"module 'genkit.serve' has no attribute {name!r}")
