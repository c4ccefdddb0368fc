"""The rating app: a Gradio UI and named API endpoints over ``RatingService``.

    diffpref app [--model embedded] [--adapter embedded-ppd] [--db outputs/app/ratings.db] [--auth users.json]

Who is who:

- ``--auth FILE`` (a JSON ``{"user": "password"}``; values may also be ``hash_password`` strings):
  people log in, and every handler takes the user id from the login (``request.username``).
  A user named in an API call must be that login (or left empty).
- Open mode (no ``--auth``) is for local use on one machine: the name a person types (or the
  ``user`` an API call names) *is* their identity, so anyone who can reach the port can act as
  anyone. Bind it to 127.0.0.1 (the default).

Either way every read or write of a pair or an image goes through ``RatingStore``'s ownership
checks, so the UI and the API cannot show or change another person's ratings or images.
Gradio's file cache is served to everyone who knows a file's URL; the app therefore returns
images as in-memory PIL images (the UI) or PNG data URIs inside JSON (the API: they never touch
the cache), cache files get unguessable keyed-hash names, and ``delete_cache`` removes them.

API (``gradio_client.Client(url[, auth=(user, password)]).predict(..., api_name="/...")``):

    next_pair(user)                        -> {"pair_id", "prompt", "left", "right", "waiting", "ratings"}
    rate(user, pair_id, choice)            -> {"rating_id", "pair_id", "choice", "label", "created", "ratings", ...}
    generate(user, prompt, seed, user_scale) -> {"base", "personalized" (None before a decided rating), ...}
    profile(user)                          -> {"method", "attributes": [{"attribute", "weight"}], ...}

Images are ``data:image/png;base64,...`` strings; ``decode_image`` turns one into a PIL image.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from diffpref.app.config import APP_HELP, add_app_arguments, config_from_args  # noqa: E402
from diffpref.app.service import (  # noqa: E402
    MAX_SEED,
    MAX_USER_SCALE,
    RatingConflictError,
    RatingService,
    to_png,
)
from diffpref.app.store import NotFoundError  # noqa: E402
from diffpref.app.validation import USER_ID_PATTERN  # noqa: E402

log = logging.getLogger(__name__)

# Seconds: every 5 minutes, delete cached files older than 15 minutes (and all of them at start).
DELETE_CACHE = (300, 900)
SCRYPT = {"n": 2**14, "r": 8, "p": 1}

# Keyboard shortcuts: 1 / left arrow = left, 2 / right arrow = right, 3 / down arrow = tie, 0 / up arrow = skip.
KEYBOARD_JS = """
() => {
  const keys = {"1": "rate-left", "ArrowLeft": "rate-left", "2": "rate-right", "ArrowRight": "rate-right",
                "3": "rate-tie", "ArrowDown": "rate-tie", "0": "rate-skip", "ArrowUp": "rate-skip"};
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.isContentEditable)) return;
    const id = keys[event.key];
    if (!id || event.repeat) return;
    let button = document.getElementById(id);
    if (button && button.tagName !== "BUTTON") button = button.querySelector("button");
    if (button && button.offsetParent !== null && !button.disabled) { event.preventDefault(); button.click(); }
  });
}
"""
CSS = """
#pair-left img, #pair-right img, #model-base img, #model-personalized img {
  image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;
}
#recent img { image-rendering: pixelated; }
#pair-prompt { text-align: center; font-size: 1.2em; }
"""


# ----------------------------------------------------------------------------- passwords
def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$<salt hex>$<key hex>``, the form ``--auth`` files may hold instead of plain passwords."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT, dklen=32)
    return f"scrypt${salt.hex()}${key.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, salt_hex, key_hex = stored.split("$")
        key = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), **SCRYPT, dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(key.hex(), key_hex)


def load_auth_file(path: str | os.PathLike) -> dict[str, str]:
    """``{user: password or scrypt hash}`` -> ``{user: salted hash}``; plain passwords are hashed on load."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a JSON object {{\"user\": \"password\"}} with at least one user")
    users = {}
    for user, secret in data.items():
        if not isinstance(user, str) or not USER_ID_PATTERN.fullmatch(user):
            raise ValueError(f"{path}: invalid user name {user!r}: use 1-64 letters, digits and _ . @ -")
        if not isinstance(secret, str) or not secret:
            raise ValueError(f"{path}: the password of {user!r} must be a non-empty string")
        users[user] = secret if secret.startswith("scrypt$") else hash_password(secret)
    return users


def make_auth(users: dict[str, str]) -> Callable[[str, str], bool]:
    """Gradio's ``auth`` callable: checks the password against the stored salted hash."""
    dummy = hash_password("")

    def check(username: str, password: str) -> bool:
        stored = users.get(username)
        ok = verify_password(password or "", stored or dummy)  # same work for unknown users
        return ok and stored is not None

    return check


# ----------------------------------------------------------------------------- images
def encode_image(image: Image.Image | None) -> str | None:
    if image is None:
        return None
    return "data:image/png;base64," + base64.b64encode(to_png(image)).decode("ascii")


def decode_image(data_uri: str) -> Image.Image:
    """A ``data:image/png;base64,...`` string from the API -> PIL image."""
    header, _, payload = data_uri.partition(",")
    if not header.startswith("data:image/png;base64"):
        raise ValueError(f"not a PNG data URI: {data_uri[:40]!r}")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
        return image.convert("RGB")


# ----------------------------------------------------------------------------- the app
class InputError(ValueError):
    """Something the person typed or clicked that the app cannot take; the message says what to do."""


def shown(message: str):
    return gr.update(value=message, visible=True)


def hidden():
    return gr.update(value="", visible=False)


class RatingApp:
    """Builds the Blocks; every handler resolves the caller's identity first (``who``)."""

    def __init__(self, service: RatingService, auth_users: dict[str, str] | None = None):
        self.service = service
        self.auth_users = auth_users
        self._known: set[str] = set()

    @property
    def auth_mode(self) -> bool:
        return self.auth_users is not None

    # -- identity
    def identify(self, claimed: Any, request: gr.Request | None) -> str:
        """The caller's user id: the login in auth mode, the named user in open mode (validated).

        Raises ``InputError`` with a message for the person; the API turns it into ``gr.Error``, the
        UI shows it next to the field (an exception there would leave an error overlay on the page)."""
        claimed = claimed.strip() if isinstance(claimed, str) else claimed
        if self.auth_mode:
            username = getattr(request, "username", None)
            if not username:
                raise InputError("log in first")
            if claimed and claimed != username:
                raise InputError(f"you are logged in as {username!r} and can only act as yourself")
            user = username
        else:
            if not claimed:
                raise InputError("enter your name first")
            if not isinstance(claimed, str) or len(claimed) > 64:
                raise InputError("names are at most 64 characters long")
            if not USER_ID_PATTERN.fullmatch(claimed):
                raise InputError("names are 1-64 characters: letters, digits and _ . @ -, starting with a letter or digit")
            user = claimed
        if user not in self._known:
            self.service.login(user)
            self._known.add(user)
        return user

    def who(self, claimed: Any, request: gr.Request | None) -> str:
        """``identify`` for the API: a bad identity is a ``gr.Error`` the client sees (no traceback logged)."""
        try:
            return self.identify(claimed, request)
        except InputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    @staticmethod
    def _call(fn: Callable, *args):
        """Run a service call; turn the errors a caller can cause into messages that reveal nothing of others."""
        try:
            return fn(*args)
        except (PermissionError, NotFoundError):
            raise gr.Error("no such pair or image among yours", print_exception=False) from None
        except (ValueError, RatingConflictError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    # -- API endpoints (JSON in, JSON out; images as PNG data URIs)
    def api_next_pair(self, user: str, request: gr.Request) -> dict:
        """The caller's next unrated pair: pair_id, prompt, left and right images (PNG data URIs)."""
        pair = self._call(self.service.next_pair, self.who(user, request))
        return {**pair, "left": encode_image(pair["left"]), "right": encode_image(pair["right"])}

    def api_rate(self, user: str, pair_id: str, choice: str, request: gr.Request) -> dict:
        """Rate one of the caller's pairs: choice is left, right, tie or skip. Final and idempotent."""
        return self._call(self.service.rate, self.who(user, request), pair_id, choice)

    def api_generate(self, user: str, prompt: str, seed: int = 0, user_scale: float = 1.0,
                     request: gr.Request = None) -> dict:
        """Base and personalized images (PNG data URIs) of one prompt and seed for the caller."""
        out = self._call(self.service.generate, self.who(user, request), prompt, seed, user_scale)
        return {**out, "base": encode_image(out["base"]), "personalized": encode_image(out["personalized"])}

    def api_profile(self, user: str, request: gr.Request) -> dict:
        """What the caller's model favours: attribute weights from personalized - base probe images."""
        return self._call(self.service.profile, self.who(user, request))

    # -- UI handlers: generators, so that a line of text says what is happening before anything slow.
    # Input errors come back as a visible message next to the field, never as an exception.
    def _pair_outputs(self, user: str, note: str = "") -> tuple:
        pair = self.service.next_pair(user)
        status = f"{pair['ratings']} ratings stored" + (f" · {note}" if note else "")
        return pair["pair_id"], f"### {pair['prompt']}", pair["left"], pair["right"], status

    def _model_outputs(self, user: str, prompt: str, seed: Any, scale: float) -> tuple:
        """(prompt box, base image, personalized image, model status, gallery, message next to the prompt)."""
        prompt = (prompt or "").strip() or self.service.last_prompt(user) or ""
        info = self.service.model_info(user)
        if not prompt:
            return gr.skip(), None, None, f"Rate a pair to start your model. {info}", [], hidden()
        try:
            out = self.service.generate(user, prompt, seed if seed is not None else 0, scale)
        except ValueError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), shown(f"⚠ {exc}")
        if out["personalized"] is None:
            header = "Your model starts with your first left/right choice (ties and skips do not count)."
            personal = gr.update(value=None, label="personalized for you")
        else:
            header = (f"Left: the base model. Right: your model at user scale **{out['user_scale']:g}**, from your "
                      f"{out['examples']} most recent choices · seed {out['seed']}")
            label = f"your model · scale {out['user_scale']:g}"
            if out.get("best_of"):  # the taste model's first of N candidates: say which, so it can be regenerated
                record = out["best_of"]
                header += f" · best of {len(record['seeds'])} by your taste: seed {record['seed']}"
                label += f" · best of {len(record['seeds'])} (seed {record['seed']})"
            personal = gr.update(value=out["personalized"], label=label)
        return prompt, out["base"], personal, f"{header}\n\n{info}", self.service.recent(user), hidden()

    def ui_start(self, name: str, prompt: str, seed: Any, scale: float, request: gr.Request):
        skip = (gr.skip(),) * (len(self.start_outputs) - 1)
        try:
            user = self.identify(name, request)
        except InputError as exc:
            yield shown(f"⚠ {exc}"), *skip
            return
        if not self.service.pair_ready(user):
            yield shown("Preparing your first pair (the app is still warming up)…"), *skip
        hello = (f"Signed in as **{user}**" + ("" if self.auth_mode else " (open mode: for local use)")
                 + f" · {self.service.model_info(user)}")
        yield (hidden(), user, gr.update(visible=False), gr.update(visible=True), hello,
               *self._pair_outputs(user), *self._model_outputs(user, prompt, seed, scale))

    def ui_rate(self, choice: str) -> Callable:
        def handler(user: str, pair_id: str, request: gr.Request):
            skip = (gr.skip(),) * 4
            try:
                user = self.identify(user, request)
            except InputError as exc:
                yield *skip, f"⚠ {exc}"
                return
            note = ""
            if pair_id:
                try:
                    result = self.service.rate(user, pair_id, choice)
                    note = f"you chose {choice}" if result["created"] else "already rated"
                except RatingConflictError:  # a double click or key repeat with another choice: keep the first
                    note = "that pair was already rated"
                except (PermissionError, NotFoundError, ValueError):
                    note = "that pair is not among yours; here is your next one"
            if not self.service.pair_ready(user):
                yield *skip, "Making your next pair (the generator is behind; a few seconds)…"
            yield self._pair_outputs(user, note)

        return handler

    def ui_model(self, user: str, prompt: str, seed: Any, scale: float, request: gr.Request):
        try:
            user = self.identify(user, request)
        except InputError as exc:
            yield *(gr.skip(),) * 5, shown(f"⚠ {exc}")
            return
        yield gr.skip(), gr.skip(), gr.skip(), f"Generating at user scale {scale:g}…", gr.skip(), hidden()
        yield self._model_outputs(user, prompt, seed, scale)

    def ui_profile(self, user: str, scale: float, request: gr.Request):
        yield "Computing your profile…", gr.skip()
        try:
            user = self.identify(user, request)
            result = self.service.profile(user, scale, wait=False)
        except (InputError, ValueError) as exc:
            yield f"⚠ {exc}", gr.skip()
            return
        if not result["attributes"]:
            yield result.get("message", "no profile yet"), result
            return
        when = (f"from your first {result['decided_then']} choices; the one with all {result['decided']} follows "
                "when you open it again" if result["stale"] else f"{result['decided']} choices")
        lines = [f"**{result['method']}** over {result['probes']} probe images, scale {result['user_scale']:g} "
                 f"({when}):", "", "| favours | weight |", "|---|---:|"]
        lines += [f"| {row['attribute']} | {row['weight']:+.3f} |" for row in result["attributes"]]
        yield "\n".join(lines), result

    # -- layout
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="diffpref: rate and personalize", analytics_enabled=False,
                       delete_cache=DELETE_CACHE) as demo:
            user_state = gr.State("")
            pair_state = gr.State("")
            gr.Markdown("## diffpref · teach an image model your taste")
            with gr.Column(visible=not self.auth_mode) as login_col:
                name = gr.Textbox(label="Your name", placeholder="letters, digits, _ . @ - (1-64)", max_length=64,
                                  elem_id="user-name")
                name_msg = gr.Markdown(visible=False, elem_id="name-message")
                start = gr.Button("Start", variant="primary", elem_id="start")
                if not self.auth_mode:
                    gr.Markdown("Open mode: your name is your identity on this machine. Run with `--auth` to share the app.")
            with gr.Column(visible=False) as main_col:
                hello = gr.Markdown(elem_id="hello")
                with gr.Tabs():
                    with gr.Tab("Rate", id="rate"):
                        prompt_md = gr.Markdown(elem_id="pair-prompt")
                        with gr.Row():
                            left = gr.Image(label="left (1 / ←)", type="pil", format="png", interactive=False,
                                            height=280, buttons=[], elem_id="pair-left")
                            right = gr.Image(label="right (2 / →)", type="pil", format="png", interactive=False,
                                             height=280, buttons=[], elem_id="pair-right")
                        with gr.Row():
                            buttons = {
                                "left": gr.Button("◀ Left is better (1)", elem_id="rate-left", variant="primary"),
                                "tie": gr.Button("Tie (3)", elem_id="rate-tie"),
                                "skip": gr.Button("Skip (0)", elem_id="rate-skip"),
                                "right": gr.Button("Right is better (2) ▶", elem_id="rate-right", variant="primary"),
                            }
                        rate_status = gr.Markdown(elem_id="rate-status")
                    with gr.Tab("Your model", id="model") as model_tab:
                        model_status = gr.Markdown("Rate a pair to start your model.", elem_id="model-status")
                        with gr.Row():
                            base_img = gr.Image(label="base model", type="pil", format="png", interactive=False,
                                                height=256, buttons=[], elem_id="model-base")
                            pers_img = gr.Image(label="personalized for you", type="pil", format="png",
                                                interactive=False, height=256, buttons=[], elem_id="model-personalized")
                        with gr.Row():
                            prompt_box = gr.Textbox(label="prompt", max_length=300, scale=3, elem_id="model-prompt")
                            seed_box = gr.Number(label="seed", value=0, precision=0, minimum=0, maximum=MAX_SEED)
                            scale_slider = gr.Slider(0.0, MAX_USER_SCALE, value=1.0, step=0.1, label="user scale",
                                                     elem_id="user-scale")
                        model_msg = gr.Markdown(visible=False, elem_id="model-message")
                        generate_btn = gr.Button("Generate", elem_id="generate")
                        gallery = gr.Gallery(label="your recent generations", columns=6, height=220, format="png",
                                             buttons=[], elem_id="recent")
                        with gr.Accordion("What your model favours", open=False):
                            profile_btn = gr.Button("Compute profile", elem_id="profile")
                            profile_md = gr.Markdown(elem_id="profile-text")
                            profile_json = gr.JSON(visible=False)

            pair_outputs = [pair_state, prompt_md, left, right, rate_status]
            model_inputs = [user_state, prompt_box, seed_box, scale_slider]
            model_outputs = [prompt_box, base_img, pers_img, model_status, gallery, model_msg]
            private = {"api_visibility": "private"}
            start_inputs = [name, prompt_box, seed_box, scale_slider]
            self.start_outputs = [name_msg, user_state, login_col, main_col, hello, *pair_outputs, *model_outputs]
            start_outputs = self.start_outputs
            if self.auth_mode:
                demo.load(self.ui_start, start_inputs, start_outputs, **private)
            else:
                start.click(self.ui_start, start_inputs, start_outputs, **private)
                name.submit(self.ui_start, start_inputs, start_outputs, **private)
            for choice, button in buttons.items():
                # Only the next pair: the model panel is drawn when its tab is opened, so a fast rater's
                # clicks do not queue generations that compete with the pair generator for the CPU.
                button.click(self.ui_rate(choice), [user_state, pair_state], pair_outputs, concurrency_limit=None,
                             **private)
            model_events = {"concurrency_id": "model", "trigger_mode": "always_last", **private}
            model_tab.select(self.ui_model, model_inputs, model_outputs, show_progress="hidden", **model_events)
            generate_btn.click(self.ui_model, model_inputs, model_outputs, **model_events)
            prompt_box.submit(self.ui_model, model_inputs, model_outputs, **model_events)
            # On release, not on every step of a drag; always_last drops the drags queued behind a generation.
            scale_slider.release(self.ui_model, model_inputs, model_outputs, **model_events)
            profile_btn.click(self.ui_profile, [user_state, scale_slider], [profile_md, profile_json], **model_events)

            gr.api(self.api_next_pair, api_name="next_pair", concurrency_limit=None)
            gr.api(self.api_rate, api_name="rate", concurrency_limit=None)
            gr.api(self.api_generate, api_name="generate", concurrency_id="model")
            gr.api(self.api_profile, api_name="profile", concurrency_id="model")
        demo.queue(default_concurrency_limit=2)
        return demo


def launch_app(service: RatingService, host: str = "127.0.0.1", port: int | None = 7860,
               auth_file: str | os.PathLike | None = None, prevent_thread_lock: bool = False,
               quiet: bool = False) -> tuple[gr.Blocks, str]:
    """Build and start the app; returns (blocks, local URL). ``demo.close()`` stops it."""
    auth_users = load_auth_file(auth_file) if auth_file else None
    demo = RatingApp(service, auth_users).build()
    db_dir = str(Path(service.store.path).resolve().parent)
    _, url, _ = demo.launch(
        server_name=host, server_port=port, auth=make_auth(auth_users) if auth_users else None,
        auth_message="diffpref rating app: log in with the name and password you were given",
        prevent_thread_lock=prevent_thread_lock, quiet=quiet, share=False, show_error=False,
        allowed_paths=[], blocked_paths=[db_dir], max_file_size="1mb", footer_links=["api"],
        ssr_mode=False, mcp_server=False, enable_monitoring=False, pwa=False,
        js=KEYBOARD_JS, css=CSS,
    )
    return demo, url


# ----------------------------------------------------------------------------- command line
def run(args: argparse.Namespace) -> int:
    if args.auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("open mode on %s: anyone who reaches this port can act as any user; use --auth FILE", args.host)
    started = time.perf_counter()
    service = RatingService(config_from_args(args))
    demo, url = launch_app(service, args.host, args.port, args.auth, prevent_thread_lock=True)
    print(f"diffpref app ready at {url} in {time.perf_counter() - started:.1f} s "
          f"({'login required' if args.auth else 'open local mode'})", flush=True)
    try:
        demo.block_thread()
    finally:
        service.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python apps/app.py [flags]``: the same flags as ``diffpref app`` (both from ``config.add_app_arguments``)."""
    parser = add_app_arguments(argparse.ArgumentParser(prog="diffpref app", description=APP_HELP))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # as `diffpref app` reports them
        print(f"diffpref: error: {exc}", file=sys.stderr)
        return 2
