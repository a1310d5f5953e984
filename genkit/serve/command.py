"""The `genkit serve` command (registered in genkit/cli.py). Only click is imported here, so
`genkit --help` stays instant; FastAPI, uvicorn and torch load when the command runs."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "-m", "models", multiple=True, envvar="GENKIT_MODEL",
              help="Model to serve (preset, folder or hub id); repeat to serve several, the first is current "
                   "(env GENKIT_MODEL; default genkit-mini).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key.")
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--api-key", envvar="GENKIT_API_KEY", default=None,
              help="Require Authorization: Bearer KEY on every route (env GENKIT_API_KEY).")
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="Keep images here, named and recorded as genkit generate does (default: a temporary folder).")
@click.option("--lora-dir", "lora_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Folder of LoRAs that requests may name (<lora:name:weight>); repeatable.")
@click.option("--controlnet-dir", "controlnet_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Folder of ControlNets (diffusers folders or .safetensors files) that A1111 requests may name "
                   "(alwayson_scripts.controlnet; GET /controlnet/model_list); repeatable.")
@click.option("--max-batch", default=8, show_default=True, help="Images per engine batch, across requests.")
@click.option("--max-queue", default=64, show_default=True, help="Images that may wait; past it 429 + Retry-After.")
@click.option("--max-images", default=16, show_default=True, help="Images one request may ask for.")
@click.option("--max-steps", default=150, show_default=True, help="Steps one request may ask for.")
@click.option("--max-size", default=2048, show_default=True, help="Largest width or height, pixels.")
@click.option("--cors", "cors", multiple=True, metavar="ORIGIN",
              help="Allow browser pages from ORIGIN to call the API (off by default); repeatable.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available).")
@click.option("--devices", default=None, metavar="LIST",
              help="A worker per device: cuda:0,cuda:1 or all (each holds the served models; batches go to a free one).")
@click.option("--workers", default=1, show_default=True, type=int,
              help="Workers per device; on a CPU, processes that divide the cores among them.")
@click.option("--dtype", default=None, help="fp32, fp16 or bf16.")
@click.option("--attention", default="auto", show_default=True, help="auto, sdpa, math, sliced, xformers, flash, flash3 or sage (genkit info: which run here).")
@click.option("--memory", default=None, metavar="AMOUNT",
              help="CUDA: plan the placement for this much GPU memory, like 12GiB (default: what is free now).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve as Ray Serve replicas, Ray's HTTP proxy on --host/--port (pip install \"genkit[ray]\").")
@click.option("--replicas", default=None, type=click.IntRange(min=1),
              help="With --ray: replicas (default one per GPU of the cluster, else one; CPUs divided among them).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="With --ray: the cluster to join, like auto or HEAD:6379 (default: start one here).")
def serve(models, host, port, api_key, out, lora_dirs, controlnet_dirs, max_batch, max_queue, max_images, max_steps,
          max_size, cors, device, dtype, attention, memory, devices, workers, use_ray, replicas, ray_address):
    """Serve models over HTTP: AUTOMATIC1111's /sdapi/v1 and OpenAI's /v1/images, and a gallery at /."""
    from genkit.errors import GenkitError
    from genkit.serve.security import check_bind

    check_bind(host, api_key)
    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--max-images", max_images),
                        ("--max-steps", max_steps), ("--max-size", max_size), ("--workers", workers)):
        if value < 1:
            raise GenkitError(f"{name} must be at least 1, got {value}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise GenkitError(f"genkit serve needs {exc.name}: pip install 'genkit[serve]'") from None
    from genkit.cli import _quiet_libraries
    from genkit.outputs import check_out_dir
    from genkit.serve.app import create_app
    from genkit.serve.limits import Limits
    from genkit.serve.runner import bind, serve as run

    if out is not None:
        check_out_dir(out)
    bind(host, port).close()  # a port in use is one line, before the slow model load
    from genkit.serve.workers import devices as device_list

    places = device_list(devices)
    if places and device:
        raise GenkitError("--device and --devices both given: pass one (--devices cuda:0,cuda:1 or --device cuda:1)")
    _quiet_libraries()
    limits = Limits(max_batch=max_batch, max_queue=max(max_queue, max_images), max_images=max_images,
                    max_steps=max_steps, max_side=max_size)
    if use_ray:  # the replicas load the models; this process deploys them and waits
        from genkit.serve import ray as on_ray

        if places or workers > 1:
            raise GenkitError("--ray places the replicas itself: pass --replicas N, not --devices or --workers")
        if controlnet_dirs:
            raise GenkitError("--controlnet-dir is not offered with --ray yet (serve ControlNets without --ray)")
        return on_ray.run(list(models) or None, host=host, port=port, replicas=replicas, address=ray_address,
                          out=out, api_key=api_key, lora_dirs=lora_dirs, limits=limits, cors=cors, device=device,
                          dtype=dtype, attention=attention, memory=memory)
    if replicas or ray_address:
        raise GenkitError("--replicas and --ray-address go with --ray")
    app = create_app(list(models) or None, out=out, api_key=api_key, lora_dirs=lora_dirs, limits=limits, cors=cors,
                     device=device, dtype=dtype, attention=attention, memory=memory, devices=places, workers=workers)
    from genkit.serve import controlnet

    controlnet.install(app, controlnet_dirs)  # the /controlnet routes and the folders' ControlNets
    from genkit.serve.metrics import log_access_to_stderr

    log_access_to_stderr()  # one JSON line per request
    where = f"[{host}]" if ":" in host else host
    click.echo(f"genkit serve: http://{where}:{port} (gallery at /, A1111 at /sdapi/v1, OpenAI at /v1)", err=True)
    from genkit.errors import command_line

    with command_line(False):  # requests' errors name the API's words, not this command's flags
        run(app, host, port)
