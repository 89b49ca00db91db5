"""The pages every signed-in person has: dashboard, API keys, playground, gallery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, FromQuery, QueryParameter
from litestar.response import File, Redirect, Template

from appliance.accounts.accounts import Account
from appliance.accounts.service import AccountService, KeyService
from appliance.core.clock import utc_clock
from appliance.core.config import Config
from appliance.core.errors import ApplianceError, BadRequest, InsufficientCredits, NotFound
from appliance.core.numbers import row_id
from appliance.jobs.catalog import Catalog
from appliance.jobs.parameters import LORA_SCALE, check_loras, check_prompts, settings_for
from appliance.jobs.service import JobRequest
from appliance.web.api.views import job_response
from appliance.web.console.gallery_query import (
    IMAGES_PER_PAGE,
    PENDING_JOBS_SHOWN,
    GalleryQuery,
    page_number,
)
from appliance.web.console.rendering import page
from appliance.web.console.security import actor
from appliance.web.console.usage_charts import usage_pictures
from appliance.web.dependencies import Accounts, Jobs, Keys, Models, Settings

Form = Body(media_type=RequestEncodingType.URL_ENCODED)


@dataclass
class KeyForm:
    name: str = ""


@dataclass
class PlaygroundForm:
    prompts: str = ""
    # Empty in a form from before there were several models: the default model.
    model: str = ""
    # One LoRA adapter at most from the playground ("" for none); its scale is
    # read here rather than by the form parser, so that a bad one gets this page.
    lora: str = ""
    lora_scale: str = "1.0"


# The API's names for what the playground's fields ask, in its refusals.
API_FIELD_NAMES = {"prompts[": "prompt line [", "lora[0].name": "lora",
                   "lora[0].scale": "lora_scale"}


def chosen_loras(form: PlaygroundForm) -> list[tuple[str, float]]:
    """The adapter the form asks for, as check_loras reads requests."""
    if not form.lora:
        return []
    try:
        scale = float(form.lora_scale)
    except ValueError:
        raise BadRequest(f"'lora_scale' is {form.lora_scale!r}; it must be a number") from None
    return [(form.lora, scale)]


def price_text(credits: int) -> str:
    return f"{credits} credit" if credits == 1 else f"{credits} credits"


def prompt_lines(text: str) -> list[str]:
    """One prompt a line; blank lines between prompts are only spacing."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def flash(request: Request, message: str) -> None:
    request.session["flash"] = message


def take_flash(request: Request) -> str | None:
    session = request.session
    return session.pop("flash", None) if isinstance(session, dict) else None


def console_image_url(job_id: str, index: int) -> str:
    return f"/console/jobs/{job_id}/images/{index}"


class ConsolePages(Controller):
    path = "/"
    include_in_schema = False

    @get("/", name="console.dashboard", sync_to_thread=True)
    def dashboard(self, request: Request[Account, Any, Any], accounts: Accounts,
                  jobs: Jobs) -> Template:
        me = request.user
        return page(request, "dashboard.html",
                    balance=accounts.get(me.id).credits,
                    recent=jobs.page(me.id, limit=5),
                    ledger=accounts.ledger(me.id, limit=15),
                    usage=usage_pictures(jobs.usage(me.id, utc_clock().date())),
                    flash=take_flash(request))

    # API keys, in the words of the hosted console.

    @get("/api-keys", name="console.keys", sync_to_thread=True)
    def key_list(self, request: Request[Account, Any, Any], keys: Keys) -> Template:
        return self._keys_page(request, keys, flash=take_flash(request))

    @post("/api-keys", sync_to_thread=True)
    def create_key(self, request: Request[Account, Any, Any], data: Annotated[KeyForm, Form],
                   keys: Keys) -> Template:
        try:
            info, raw = keys.create(request.user.id, data.name, actor(request))
        except ApplianceError as exc:
            return self._keys_page(request, keys, status_code=exc.status, error=exc.message,
                                   name=data.name)
        # The one time the key exists outside the client: shown in this
        # response, never stored, never put in the session.
        return self._keys_page(request, keys, status_code=201, new_key=raw, new_key_info=info)

    # Ids and indices in these addresses are read as text and parsed with
    # row_id: a route's `int` takes what int() takes ("٣", "1_0") and any size.
    @post("/api-keys/{key_id:str}/delete", sync_to_thread=True)
    def delete_key(self, request: Request[Account, Any, Any], key_id: FromPath[str],
                   keys: Keys) -> Redirect:
        number = row_id(key_id)
        if number is None:
            raise NotFound("No such key: it may have been deleted already")
        key = keys.delete_by_id(request.user.id, number, actor(request))
        flash(request, f"Deleted key “{key.name}” ({key.prefix}…). It is refused from now on.")
        return Redirect("/console/api-keys", status_code=303)

    @staticmethod
    def _keys_page(request: Request[Account, Any, Any], keys: KeyService, status_code: int = 200,
                   **context: Any) -> Template:
        return page(request, "keys.html", status_code=status_code,
                    keys=keys.live(request.user.id), **context)

    # Playground: the same service, validation and charge as the API.

    @get("/playground", name="console.playground", sync_to_thread=True)
    def playground(self, request: Request[Account, Any, Any], accounts: Accounts,
                   catalog: Models, config: Settings) -> Template:
        return self._playground_page(request, accounts, catalog, config)

    @post("/playground", sync_to_thread=True)
    def submit(self, request: Request[Account, Any, Any], data: Annotated[PlaygroundForm, Form],
               accounts: Accounts, jobs: Jobs, config: Settings,
               catalog: Models) -> Template | Redirect:
        try:
            prompts = check_prompts(prompt_lines(data.prompts), config.limits)
            model = catalog.model(data.model or None)
            loras = check_loras(catalog, model, chosen_loras(data), "lora")
            settings = settings_for(config.generation, config.limits, {}, model, loras=loras)
            # A console job has no API key: the account itself asked for it.
            submitted = jobs.submit(JobRequest(request.user.id, None, prompts, settings,
                                               credits_per_image=model.credits_per_image))
        except ApplianceError as exc:
            message = exc.message
            if isinstance(exc, BadRequest):
                for api_name, field_name in API_FIELD_NAMES.items():
                    message = message.replace(api_name, field_name)
            # Said with the refusal: where more credits come from (the template words it
            # for an admin, who grants them, or for anyone else, who asks one).
            return self._playground_page(request, accounts, catalog, config,
                                         status_code=exc.status,
                                         error=message, form=data,
                                         credits_needed=isinstance(exc, InsufficientCredits))
        return Redirect(f"/console/jobs/{submitted.job_id}", status_code=303)

    @staticmethod
    def _playground_page(request: Request[Account, Any, Any], accounts: AccountService,
                         catalog: Catalog, config: Config, status_code: int = 200,
                         form: PlaygroundForm | None = None, **context: Any) -> Template:
        form = form or PlaygroundForm()
        # Only models a job can be made with; a broken one is on the System page.
        models = [model for model in catalog.models() if not model.problem]
        by_name = {model.name: model for model in models}
        # The one asked for before a refusal, else the default, else any that works.
        selected = (by_name.get(form.model) or by_name.get(catalog.default_name)
                    or next(iter(models), None))
        return page(request, "playground.html", status_code=status_code,
                    balance=accounts.get(request.user.id).credits, limits=config.limits,
                    models=models, selected=selected, loras=catalog.loras(),
                    lora_scale_bounds=LORA_SCALE, price_text=price_text, form=form, **context)

    # Gallery and job pages: only ever the signed-in account's own jobs.

    @get("/jobs", name="console.gallery", sync_to_thread=True)
    def gallery(self, request: Request[Account, Any, Any], jobs: Jobs,
                page_text: Annotated[str, QueryParameter(name="page")] = "1",
                job: FromQuery[str] = "", key: FromQuery[str] = "",
                since: Annotated[str, QueryParameter(name="from")] = "",
                until: Annotated[str, QueryParameter(name="to")] = "") -> Template:
        """Every made image of the account across its jobs, newest first, filtered and paged."""
        query = GalleryQuery(job=job, key=key, since=since, until=until)
        where, number = query.to_filter(), page_number(page_text)
        found = jobs.gallery(request.user.id, where, limit=IMAGES_PER_PAGE,
                             offset=(number - 1) * IMAGES_PER_PAGE)
        pages = max(1, -(-found.total // IMAGES_PER_PAGE))
        if number > pages:
            raise BadRequest(f"There is no such page of images: page {number} of {pages}")
        return page(request, "gallery.html", images=found.images, total=found.total,
                    page_number=number, pages=pages, query=query,
                    keys=jobs.gallery_keys(request.user.id),
                    pending=jobs.pending(request.user.id, PENDING_JOBS_SHOWN))

    @get("/jobs/{job_id:str}", name="console.job", sync_to_thread=True)
    def job(self, request: Request[Account, Any, Any], job_id: FromPath[str],
            jobs: Jobs) -> Template:
        job = jobs.read(request.user.id, job_id)
        return page(request, "job.html", job=job, finished=job.status.finished)

    @get("/jobs/{job_id:str}/progress", sync_to_thread=True)
    def progress(self, request: Request[Account, Any, Any], job_id: FromPath[str],
                 jobs: Jobs) -> dict[str, Any]:
        """The job as the API answers it, with console image links and whether it has ended."""
        job = jobs.read(request.user.id, job_id)
        return {**msgspec.to_builtins(job_response(job, console_image_url)),
                "finished": job.status.finished}

    @get("/jobs/{job_id:str}/images/{index:str}", sync_to_thread=True, media_type="image/png")
    def image(self, request: Request[Account, Any, Any], job_id: FromPath[str],
              index: FromPath[str], jobs: Jobs, download: FromQuery[bool] = False) -> File:
        number = row_id(index)
        if number is None:
            raise NotFound("There is no such image")
        path = jobs.image_path(request.user.id, job_id, number)
        return File(path, media_type="image/png", filename=f"{job_id}-{number}.png",
                    content_disposition_type="attachment" if download else "inline",
                    headers={"Cache-Control": "private, max-age=3600"})
