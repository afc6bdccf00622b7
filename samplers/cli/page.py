"""A web page that shows a diffusion LM writing (``ddlm-demo``; Gradio, the optional extra ``ddlm[demo]``).

The page takes a prompt (and optionally a suffix to infill before), a sampler, steps, length, temperature and
seed, and redraws the canvas after every sampler step: masked positions as grey blocks, the prompt and suffix
in blue, committed tokens in black (the newest in bold).  The text at the end is what ``ddlm-generate`` prints
for the same model, prompt, suffix, sampler, steps, length, temperature and seed, because both build the canvas
and draw the sample with the same functions (:mod:`samplers.cli.generate`, :func:`samplers.cli.batches.
generate_in_batches`); the network calls and seconds are shown with it.

Only the models named when the server started can be chosen: a request for any other path or Hub id is refused
(:class:`DemoModels`), so the page cannot make the server read other files.  A bad request (0 steps, an unknown
sampler, a sampler that does not suit the model) is answered with one line in the status box; the server keeps
serving.
"""

from __future__ import annotations

import html
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..base import FREE, SAMPLERS, get_sampler
from .batches import generate_in_batches
from .generate import prompt_tokens, suffix_tokens

__all__ = ["DemoModels", "DemoRequest", "Frame", "build_app", "canvas_html", "denoise", "make_handler"]

STYLE = """
.ddlm-canvas { font-family: monospace; font-size: 15px; line-height: 1.9; white-space: pre-wrap; }
.ddlm-canvas .masked { background: #d0d0d0; color: #d0d0d0; border-radius: 2px; }
.ddlm-canvas .fixed { color: #1f4e9e; }
.ddlm-canvas .new { font-weight: bold; background: #fff3b0; }
"""


@dataclass(frozen=True)
class DemoRequest:
    """One generation as the page asks for it."""

    model: str
    prompt: str = ""
    suffix: str = ""
    sampler: str = "ancestral"
    steps: int = 32
    length: int = 48
    temperature: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the first bad field, before any model is loaded."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        for name in ("steps", "length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {name}={value!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 and finite, got temperature={self.temperature!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got seed={self.seed!r}")


@dataclass(frozen=True)
class Frame:
    """The canvas after one step (``done`` False) or the finished sample (``done`` True, with its text)."""

    html: str
    step: int
    done: bool = False
    text: str = ""
    calls: int = 0
    seconds: float = 0.0


class DemoModels:
    """The models this server may load (those named on its command line), each loaded once on first use."""

    def __init__(self, allowed: list[str], *, trust_remote_code: bool = False) -> None:
        if not allowed:
            raise ValueError("give at least one model folder or Hub id")
        self.allowed, self.trust_remote_code = list(dict.fromkeys(allowed)), trust_remote_code
        self._loaded: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> tuple[Any, Any]:
        """``(model, tokenizer)``; a name not given at start is refused without touching the file system."""
        if name not in self.allowed:
            raise ValueError(f"model {name!r} is not one this server was started with ({self.allowed})")
        with self._lock:
            if name not in self._loaded:
                from diffusion.cli.loading import load_denoiser_for

                model, tokenizer = load_denoiser_for(name, trust_remote_code=self.trust_remote_code)
                self._loaded[name] = (model.eval(), tokenizer)
            return self._loaded[name]


def canvas_html(tokens: list[int], tokenizer: Any, mask_id: int | None, fixed: list[bool],
                newest: set[int] | None = None) -> str:
    """The canvas as HTML: masked positions as grey blocks, fixed (prompt, suffix) tokens blue, ``newest`` bold."""
    pieces = []
    for position, token in enumerate(tokens):
        if token == mask_id or token == FREE:
            pieces.append('<span class="masked">\u2588\u2588</span>')
            continue
        text = html.escape(tokenizer.decode([token]))
        kind = "fixed" if fixed[position] else "new" if newest and position in newest else "committed"
        pieces.append(f'<span class="{kind}">{text}</span>')
    return '<div class="ddlm-canvas">' + "".join(pieces) + "</div>"


def denoise(models: DemoModels, request: DemoRequest) -> Iterator[Frame]:
    """Run one generation, yielding a :class:`Frame` after every sampler step and one at the end.

    The sampler runs in a worker thread; its per-step callback hands each canvas to this generator, so the page
    redraws while the model works.  Errors (bad request, unsuitable sampler) are raised here as ValueError.
    """
    request.check()
    model, tokenizer = models.get(request.model)
    options = {"temperature": float(request.temperature)}
    try:
        sampler = get_sampler(request.sampler, **options)
    except TypeError as error:
        raise ValueError(f"sampler {request.sampler!r} does not take a temperature") from error
    prefix = prompt_tokens(tokenizer, request.prompt, False) if request.prompt.strip() else []
    suffix = suffix_tokens(tokenizer, request.suffix) if request.suffix.strip() else []
    row = prefix + [FREE] * request.length + suffix
    fixed = [token != FREE for token in row]
    mask_id = model.config.mask_token_id
    frames: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["out"] = next(generate_in_batches(
                sampler, model, row, 1, 1, num_steps=request.steps,
                generator=torch.Generator().manual_seed(request.seed),
                callback=lambda step, x: frames.put((step, x[0].tolist()))))
        except Exception as error:  # noqa: BLE001  (handed to the page's thread below)
            outcome["error"] = error
        finally:
            frames.put(None)

    start = time.perf_counter()
    previous = row
    threading.Thread(target=work, daemon=True).start()
    while (item := frames.get()) is not None:
        step, tokens = item
        newest = {i for i, (a, b) in enumerate(zip(previous, tokens)) if a != b and b != mask_id}
        previous = tokens
        yield Frame(html=canvas_html(tokens, tokenizer, mask_id, fixed, newest), step=step + 1)
    if "error" in outcome:
        raise outcome["error"]
    out = outcome["out"]
    tokens = out.tokens[0].tolist()
    yield Frame(html=canvas_html(tokens, tokenizer, mask_id, fixed), step=request.steps, done=True,
                text=tokenizer.decode(tokens, skip_special_tokens=True), calls=int(out.nfe),
                seconds=time.perf_counter() - start)


def make_handler(models: DemoModels) -> Any:
    """The page's generate function: page values in, ``(canvas html, text, status)`` out after every step.

    ``delay`` seconds pass between shown steps (0: as fast as the model goes), so the denoising can be watched on a
    fast machine.  Bad values become an ``error: ...`` status line; nothing is raised to the server.
    """

    def run(model: str, prompt: str, suffix: str, sampler: str, steps: float, length: float, temperature: float,
            seed: float, delay: float = 0.0) -> Iterator[tuple[str, str, str]]:
        try:
            request = DemoRequest(model=model, prompt=prompt or "", suffix=suffix or "", sampler=sampler,
                                  steps=_whole(steps), length=_whole(length), temperature=float(temperature),
                                  seed=_whole(seed))
            pause = float(delay or 0.0)
            if not (math.isfinite(pause) and 0 <= pause <= 5):
                raise ValueError(f"delay must be between 0 and 5 seconds, got delay={delay!r}")
            for frame in denoise(models, request):
                if frame.done:
                    yield (frame.html, frame.text,
                           f"done: {frame.calls} network calls, {frame.seconds:.2f} s ({request.sampler}, "
                           f"{request.steps} steps, seed {request.seed})")
                else:
                    yield frame.html, "", f"step {frame.step} of {request.steps}"
                    if pause:
                        time.sleep(pause)
        except ValueError as error:
            yield "", "", f"error: {' '.join(str(error).split())}"

    return run


def build_app(models: DemoModels) -> Any:
    """The Gradio page (``gradio.Blocks``) over ``models``."""
    import gradio as gr

    with gr.Blocks(title="ddlm: watch it write") as app:
        gr.HTML(f"<style>{STYLE}</style>")
        gr.Markdown("## ddlm: watch a diffusion LM write\nMasked positions are grey; the prompt and suffix are blue; "
                    "each step's new tokens are highlighted.")
        with gr.Row():
            model = gr.Dropdown(models.allowed, value=models.allowed[0], label="model", elem_id="model")
            sampler = gr.Dropdown(sorted(SAMPLERS), value="ancestral", label="sampler", elem_id="sampler",
                                  allow_custom_value=True)
        prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt")
        suffix = gr.Textbox(label="suffix (optional: the text to infill before)", lines=1, elem_id="suffix")
        with gr.Row():
            steps = gr.Number(value=32, precision=0, label="steps", elem_id="steps")
            length = gr.Number(value=48, precision=0, label="length (tokens)", elem_id="length")
            temperature = gr.Number(value=1.0, label="temperature", elem_id="temperature")
            seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
            delay = gr.Number(value=0.05, label="seconds between shown steps", elem_id="delay")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        canvas = gr.HTML(elem_id="canvas")
        text = gr.Textbox(label="text", interactive=False, lines=4, elem_id="text")
        status = gr.Textbox(label="status", interactive=False, elem_id="status")
        button.click(make_handler(models), [model, prompt, suffix, sampler, steps, length, temperature, seed, delay],
                     [canvas, text, status])
    return app


def _whole(value: Any) -> Any:
    """A number from the page as an int when it is whole (checked later), else unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
