"""SGLang's frontend language on an in-process ``sglang.Engine``: :class:`EngineBackend`.

SGLang 0.5.23 ships one backend for its own runtime, ``RuntimeEndpoint``, which posts every
call to a server's ``/generate`` over HTTP. :class:`EngineBackend` is the same backend for an
``sglang.Engine`` living in this process (FreeKV on or off): it builds the request
``RuntimeEndpoint`` would post (the same fields, the same sampling parameters, the same
``select`` scoring) as a ``GenerateReqInput`` and hands it to the engine's
``TokenizerManager.generate_request``, which is what the HTTP handler does with the JSON body.
The engine is borrowed, not owned: :meth:`EngineBackend.shutdown` leaves it running.

Who calls what, on which thread:

- The interpreter (``sglang.lang.interpreter``) gives every ``StreamExecutor`` its own worker
  thread; ``fork(n)`` makes ``n`` more. Those threads call :meth:`generate`,
  :meth:`generate_stream`, :meth:`select`, :meth:`commit_lazy_operations` and
  :meth:`cache_prefix` concurrently. The thread that runs the program (``program.run``) calls
  :meth:`get_chat_template` and :meth:`end_program`.
- ``sglang.Engine`` is not safe to call from several threads: ``Engine.generate`` runs
  ``self.loop.run_until_complete(...)`` on the one asyncio loop the engine's
  ``TokenizerManager`` lives on (its ZMQ sockets and its ``handle_loop`` task, which receives
  the detokenizer's outputs, belong to that loop), and a second thread entering
  ``run_until_complete`` while the first is inside fails with "this event loop is already
  running". A plain lock would make that safe but would also run the branches of a ``fork``
  one after another, where the scheduler could batch them.
- So :class:`_LoopDriver` runs the engine's loop on one private thread
  (``freekv-engine-loop``) for as long as at least one backend call is in flight, and every
  call submits its coroutine to that loop with ``asyncio.run_coroutine_threadsafe`` and waits
  for the result on its own thread. Concurrent calls are therefore concurrent requests to the
  scheduler (the fork branches decode in one batch). When the last call in flight returns, the
  driver stops the loop and joins the thread, so between calls the loop is idle and
  ``engine.generate(...)`` on the engine's own thread works as before. Calling the engine's
  synchronous methods from another thread *while* a program runs on this backend is not
  supported (the loop is running elsewhere); :meth:`_LoopDriver.enter` refuses with a clear
  error if it finds the loop already running when it wants to start it.
- ``_LoopDriver._lock`` protects the in-flight count and the loop thread handle; it is held
  while the loop thread starts and while it is stopped and joined, never while a request runs.
  All ``TokenizerManager`` calls (``generate_request``, ``abort_request``, ``flush_cache``)
  run on the loop thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
import warnings
import weakref
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import get_chat_template, get_chat_template_by_model_path
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglang.lang.global_config import global_config
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglSamplingParams
from sglang.srt.managers.io_struct import GenerateReqInput

if TYPE_CHECKING:
    import sglang

T = TypeVar("T")

#: Request fields a ``SglSamplingParams`` carries outside its ``sampling_params`` dict (the
#: same list ``RuntimeEndpoint`` copies into its JSON body).
_LOGPROB_FIELDS: tuple[str, ...] = (
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
)


class _LoopDriver:
    """Runs one asyncio loop on a private thread while any caller needs it (see module doc).

    :meth:`for_loop` gives every backend of one loop the same driver (several backends on one
    engine, or engines that share the main thread's loop one after another), so their calls
    share the in-flight count instead of one backend finding the loop run by another's thread.
    """

    _by_loop: ClassVar[weakref.WeakValueDictionary[int, _LoopDriver]] = (
        weakref.WeakValueDictionary()
    )
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> _LoopDriver:
        """The driver of ``loop``, made on first use. Keyed by ``id(loop)``: a driver holds its
        loop, so the id cannot be reused while the entry is alive."""
        with cls._registry_lock:
            driver = cls._by_loop.get(id(loop))
            if driver is None:
                driver = cls(loop)
                cls._by_loop[id(loop)] = driver
            return driver

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()  # guards _users and _thread
        self._users = 0
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def enter(self) -> None:
        """Count one more caller; start the loop thread if this is the first."""
        with self._lock:
            if self._thread is None:
                if self._loop.is_running():
                    raise RuntimeError(
                        "the engine's event loop is already running on another thread; "
                        "EngineBackend needs the engine to itself while a program runs"
                    )
                started = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(started,), name="freekv-engine-loop", daemon=True
                )
                thread.start()
                started.wait()
                self._thread = thread
            self._users += 1

    def exit(self) -> None:
        """Count one caller less; stop the loop and join its thread after the last."""
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._thread is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
                self._thread = None

    def _run(self, started: threading.Event) -> None:
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result on the calling thread."""
        try:
            self.enter()
        except BaseException:
            coro.close()
            raise
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        finally:
            self.exit()


def _normalized_prompt_logprob(input_token_logprobs: list[list[Any]]) -> float:
    """Mean logprob of the prompt tokens that have one (the first token has none).

    ``-inf`` when no token has one (an empty window), so such a choice never wins ``argmax``.
    """
    values = [entry[0] for entry in input_token_logprobs if entry[0] is not None]
    if not values:
        return float("-inf")
    return sum(values) / len(values)


class EngineBackend(BaseBackend):
    """A frontend-language backend that drives an in-process ``sglang.Engine``.

    ``engine`` must have a tokenizer (the default). ``chat_template_name`` picks a frontend chat
    template by name; by default it is matched from the model path, as ``RuntimeEndpoint``
    does with the server's model path.
    """

    def __init__(self, engine: sglang.Engine, chat_template_name: str | None = None) -> None:
        super().__init__()
        self.engine = engine
        self._tokenizer_manager = engine.tokenizer_manager
        self._driver = _LoopDriver.for_loop(engine.loop)
        self.model_path: str = str(self._tokenizer_manager.model_path)
        if chat_template_name:
            self.chat_template = get_chat_template(chat_template_name)
        else:
            self.chat_template = get_chat_template_by_model_path(self.model_path)

    # --- what the interpreter asks of a backend -------------------------------------------

    def get_model_name(self) -> str:
        return self.model_path

    def cache_prefix(self, prefix_str: str) -> None:
        self._generate_one({"text": prefix_str, "sampling_params": {"max_new_tokens": 0}})

    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        self._generate_one(self._with_images(s, self._prefill_body(s)))

    def fill_image(self, s: StreamExecutor) -> None:
        self._generate_one(self._with_images(s, self._prefill_body(s)))

    def flush_cache(self) -> None:
        self._driver.run(self._tokenizer_manager.flush_cache())

    def generate(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> tuple[str, dict[str, Any]]:
        out = self._generate_one(self._gen_body(s, sampling_params))
        return out["text"], out["meta_info"]

    def generate_stream(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        body = self._gen_body(s, sampling_params)
        body["stream"] = True
        body["rid"] = uuid.uuid4().hex
        pos = 0
        for out in self._stream(body):
            piece = out["text"][pos:]
            pos += len(piece)
            yield piece, out["meta_info"]

    def select(
        self,
        s: StreamExecutor,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod | None = None,
    ) -> ChoicesDecision:
        if temperature > 1e-5:
            raise ValueError(f"select scores choices greedily; got temperature {temperature}")
        if choices_method is None:
            from sglang.lang.choices import token_length_normalized

            choices_method = token_length_normalized
        # The shared prefix first: its length places the logprob window (one token back, so a
        # choice whose first token merges with the prefix's last one is still scored).
        prefix = self._generate_one(self._with_images(s, self._prefill_body(s)))
        start = max(int(prefix["meta_info"]["prompt_tokens"]) - 2, 0)
        scored = self._generate_list(
            self._with_images(
                s,
                {
                    "text": [s.text_ + c for c in choices],
                    "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                    "return_logprob": True,
                    "return_text_in_logprobs": True,
                    "logprob_start_len": start,
                },
            )
        )
        input_lps = [list(r["meta_info"]["input_token_logprobs"]) for r in scored]
        output_lps = [r["meta_info"]["output_token_logprobs"] for r in scored]
        normalized = [_normalized_prompt_logprob(lp) for lp in input_lps]
        for i, lps in enumerate(input_lps):
            # The window's first token belongs to the prefix unless tokenization merged it
            # with the choice: drop it (and its share of the mean) when the prefix ends with it.
            if s.text_.endswith(lps[0][2]):
                input_lps[i] = lps[1:]
                normalized[i] = _normalized_prompt_logprob(input_lps[i])
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            ids = [[entry[1] for entry in lps] for lps in input_lps]
            bare = self._generate_list(
                self._with_images(
                    s,
                    {
                        "input_ids": ids,
                        "sampling_params": {"max_new_tokens": 0},
                        "return_logprob": True,
                    },
                )
            )
            unconditional = [r["meta_info"]["input_token_logprobs"] for r in bare]
        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_lps,
            output_token_logprobs=output_lps,
            unconditional_token_logprobs=unconditional,
        )

    def shutdown(self) -> None:
        """Nothing to release: the engine belongs to the caller, who shuts it down."""

    # --- requests -----------------------------------------------------------------------------

    @staticmethod
    def _prefill_body(s: StreamExecutor) -> dict[str, Any]:
        return {"text": s.text_, "sampling_params": {"max_new_tokens": 0}}

    @staticmethod
    def _with_images(s: StreamExecutor, body: dict[str, Any]) -> dict[str, Any]:
        if s.images_:
            if len(s.images_) != 1:
                raise ValueError("EngineBackend supports one image per program")
            body["image_data"] = s.images_[0][1]
        return body

    def _gen_body(self, s: StreamExecutor, sp: SglSamplingParams) -> dict[str, Any]:
        params = sp.to_srt_kwargs()
        params["stop"] = (
            [params["stop"]] if isinstance(params["stop"], str) else list(params["stop"])
        )
        params["stop_token_ids"] = list(params["stop_token_ids"] or [])
        stop_regex = params["stop_regex"]
        params["stop_regex"] = [stop_regex] if isinstance(stop_regex, str) else list(stop_regex)
        if sp.dtype is not None:
            regex, extra_stops = _dtype_regex(sp.dtype)
            if sp.regex is not None:
                warnings.warn(
                    f"both dtype and regex are set; dtype {sp.dtype!r} wins over regex {sp.regex!r}",
                    stacklevel=3,
                )
            params["regex"] = regex
            params["stop"] += extra_stops
        body: dict[str, Any] = {
            "text": s.text_,
            "sampling_params": {
                "skip_special_tokens": global_config.skip_special_tokens_in_output,
                "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
                **params,
            },
        }
        for name in _LOGPROB_FIELDS:
            value = getattr(sp, name, None)
            if value is not None:
                body[name] = value
        return self._with_images(s, body)

    async def _first(self, body: dict[str, Any]) -> Any:
        # A non-streamed request yields once, when it has finished (as ``/generate`` and
        # ``Engine.generate`` use it).
        gen = self._tokenizer_manager.generate_request(GenerateReqInput(**body), None)
        return await gen.__anext__()

    def _generate_one(self, body: dict[str, Any]) -> dict[str, Any]:
        out = self._driver.run(self._first(body))
        if not isinstance(out, dict):
            raise TypeError(f"expected one result, got {type(out).__name__}")
        return out

    def _generate_list(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._driver.run(self._first(body))
        if not isinstance(out, list):
            raise TypeError(f"expected a batch result, got {type(out).__name__}")
        return out

    def _stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield the cumulative outputs of one streamed request as the loop produces them.

        A consumer that stops early aborts the request; the generator still waits for the
        request's task to end before it lets the loop stop.
        """
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        tm = self._tokenizer_manager

        async def pump() -> None:
            try:
                async for out in tm.generate_request(GenerateReqInput(**body), None):
                    items.put(("out", out))
            except Exception as e:  # handed to the consumer's thread below
                items.put(("error", e))
            else:
                items.put(("end", None))

        self._driver.enter()
        try:
            task = asyncio.run_coroutine_threadsafe(pump(), self._driver.loop)
            finished = False
            try:
                while True:
                    kind, value = items.get()
                    if kind == "out":
                        yield value
                        continue
                    finished = True
                    if kind == "error":
                        raise value
                    return
            finally:
                if not finished:
                    self._driver.loop.call_soon_threadsafe(tm.abort_request, body["rid"])
                task.result()
        finally:
            self._driver.exit()


def _dtype_regex(dtype: object) -> tuple[str, list[str]]:
    """The regex (and extra stop strings) that constrains a ``gen(dtype=...)`` to the type."""
    if dtype in ("int", int):
        return REGEX_INT, [" ", "\n"]
    if dtype in ("float", float):
        return REGEX_FLOAT, [" ", "\n"]
    if dtype in ("str", str):
        return REGEX_STR, []
    if dtype in ("bool", bool):
        return REGEX_BOOL, []
    raise ValueError(f"invalid dtype for gen: {dtype!r}")
