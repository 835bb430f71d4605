"""The ``diffulex`` command: ``diffulex generate`` (offline) and ``diffulex serve`` (OpenAI-compatible HTTP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diffulex.config import ConfigError, parse_override

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Diffulex: serve diffusion LMs.")


@app.callback()
def main() -> None:
    """Diffulex: a serving engine for diffusion language models."""


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (repeatable).")],
    model: Annotated[str | None, typer.Option(help="Checkpoint folder; default: the bundled model.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML launch config.")] = None,
    set_: Annotated[
        list[str], typer.Option("--set", help="Engine option override key=value (repeatable).")
    ] = [],  # noqa: B006
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    steps: Annotated[int | None, typer.Option(help="Total denoising steps (default: max_tokens).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Confidence-threshold unmasking.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Always return max_tokens tokens.")] = False,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the prompt as is, without the model's chat template.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt.")] = False,
) -> None:
    """Generate a completion for each --prompt and print it."""
    from diffulex.llm import LLM, chat_prompt_ids
    from diffulex.sampling_params import SamplingParams

    try:
        overrides = dict(parse_override(item) for item in set_)
        if _torchrun_worker_served(config, overrides, model):
            return  # a torchrun rank other than 0: it served rank 0's engine until it closed
        llm = LLM(model, config=config, overrides=overrides)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            steps=steps,
            threshold=threshold,
            ignore_eos=ignore_eos,
        )
        tokenizer = llm.tokenizer
        chat = not raw and tokenizer is not None and getattr(tokenizer, "chat_template", None)
        inputs = [chat_prompt_ids(tokenizer, text) for text in prompt] if chat else list(prompt)
        try:
            outputs = llm.generate(inputs, params)
        finally:
            llm.close()  # tensor-parallel workers, if any
    except (ConfigError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    for text, output in zip(prompt, outputs):
        if as_json:
            record = {
                "prompt": text,
                "text": output.text,
                "token_ids": output.token_ids,
                "finish_reason": output.finish_reason,
                "num_forwards": output.num_forwards,
            }
            typer.echo(json.dumps(record))
        else:
            typer.echo(output.text if output.text is not None else " ".join(map(str, output.token_ids)))


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option(help="YAML launch config with engine: and server: sections.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Checkpoint folder; default: the bundled model.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000).")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Require this Bearer key on /v1/* (default: $DIFFULEX_API_KEY).")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients send (default: the checkpoint folder's name).")
    ] = None,
    data_parallel_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Engine replicas, each in its own process (one GPU each); default 1 (in-process)."
        ),
    ] = None,
    tensor_parallel_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Ranks one model is split over, one process (GPU) each, started by the server; under "
            "torchrun, the launch's processes. Default 1.",
        ),
    ] = None,
    expert_parallel_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="MoE models: split the experts (whole) over the tensor-parallel ranks, tokens sent to them "
            "with all-to-all; 1 or --tensor-parallel-size. Default 1.",
        ),
    ] = None,
    set_: Annotated[
        list[str],
        typer.Option(
            "--set",
            help="Override key=value (repeatable): an engine option, or a server one "
            "(host, port, api_key, served_model_name, request_timeout_s; or server.<key>).",
        ),
    ] = [],  # noqa: B006
) -> None:
    """Serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)."""
    from diffulex.config import load_serve_config
    from diffulex.llm import default_model_path

    try:
        overrides = dict(parse_override(item) for item in set_)
        if data_parallel_size is not None:  # an explicit flag: below --set in priority, like --model
            overrides = {"data_parallel_size": data_parallel_size, **overrides}
        if tensor_parallel_size is not None:
            overrides = {"tensor_parallel_size": tensor_parallel_size, **overrides}
        if expert_parallel_size is not None:
            overrides = {"expert_parallel_size": expert_parallel_size, **overrides}
        engine_config, server_config = load_serve_config(
            config,
            overrides=overrides,
            model=model,
            default_model=default_model_path,
            host=host,
            port=port,
            api_key=api_key,
            served_model_name=served_model_name,
        )
    except (ConfigError, ValueError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    from diffulex.engine.tp_workers import launched_by_torchrun, run_torchrun_worker

    if launched_by_torchrun() and engine_config.data_parallel_size > 1:
        typer.echo(
            "error: under torchrun, data_parallel_size must be 1 (torchrun's ranks are one TP group)",
            err=True,
        )
        raise typer.Exit(2)
    if run_torchrun_worker(engine_config):
        return  # a torchrun rank other than 0: it served rank 0's engine until the server stopped
    from diffulex.server.app import build_and_run

    build_and_run(engine_config, server_config)


def _torchrun_worker_served(config: Path | None, overrides: dict, model: str | None) -> bool:
    """``generate`` under torchrun on a rank other than 0: build the engine config as rank 0 does and
    serve as its tensor-parallel worker until it closes (True); False anywhere else."""
    from diffulex.config import load_serve_config
    from diffulex.engine.tp_workers import launched_by_torchrun, run_torchrun_worker
    from diffulex.llm import default_model_path

    if not launched_by_torchrun():
        return False
    engine_config, _ = load_serve_config(
        config, overrides=overrides, model=model, default_model=default_model_path
    )
    return run_torchrun_worker(engine_config)


if __name__ == "__main__":
    app()
