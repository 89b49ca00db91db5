"""The console's gallery: every made image of the signed-in account, filtered and paged."""

from __future__ import annotations

import re

import pytest

from appliance.accounts import audit, keys
from appliance.jobs import store
from appliance.web.console.gallery_query import IMAGES_PER_PAGE

from .console_helpers import HTML, TIMES, sign_in
from .helpers import TEST_GENERATION, bearer

API = "/api/playground/images"
GALLERY = "/console/jobs"
SETTINGS = store.GenerationSettings(**TEST_GENERATION)
# Each thumbnail names its job and index; the grid's order is the order of these.
ITEM = re.compile(r'data-lightbox-item data-job-id="([0-9a-f-]{36})" data-image-index="(\d+)"')


def made(db, account_id: int, prompts: list[str], when: str, key_id: int | None = None,
         settings: store.GenerationSettings = SETTINGS) -> str:
    """A job whose images were all made at `when`, written as the worker writes them
    (no PNG files: the pages only link to them)."""
    submitted = store.submit(db, account_id, key_id, prompts, settings, seed=100)
    store.mark_completed(db, submitted.images)
    db.execute("UPDATE job_images SET finished_at = ? WHERE job_id = ?",
               [when, submitted.job_id])
    db.execute("UPDATE jobs SET created_at = ? WHERE id = ?", [when, submitted.job_id])
    db.conn.commit()
    return submitted.job_id


def shown(response) -> list[tuple[str, int]]:
    assert response.status_code == 200, response.text
    return [(job, int(index)) for job, index in ITEM.findall(response.text)]


def test_the_grid_shows_only_the_accounts_made_images_newest_first(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    me = client.account("me@example.com", credits=20)
    other = client.account("other@example.com", credits=20)
    old = made(db, me.id, ["an old fox", "an old owl"], "2025-01-01T10:00:00.000Z")
    new = made(db, me.id, ["a new fox"], "2025-03-01T10:00:00.000Z")
    theirs = made(db, other.id, ["their secret"], "2025-04-01T10:00:00.000Z")
    # An image still waiting, or failed, is not in the grid; its job page tells its status.
    waiting = store.submit(db, me.id, None, ["still queued"], SETTINGS)
    failed = store.submit(db, me.id, None, ["broken"], SETTINGS)
    store.mark_failed(db, failed.images, "out of memory")

    sign_in(http, "me@example.com")
    page = http.get(GALLERY)
    assert shown(page) == [(new, 0), (old, 0), (old, 1)]
    assert theirs not in page.text and "their secret" not in page.text
    assert "still queued" not in page.text and "broken" not in page.text
    # A job still to come is listed above the grid, its progress watched until it ends.
    in_progress = page.text.split('aria-labelledby="in-progress"')[1].split("</section>")[0]
    assert re.findall(r'<li data-job-id="([0-9a-f-]{36})">', in_progress) == [waiting.job_id]
    assert f'data-progress-url="/console/jobs/{waiting.job_id}/progress"' in in_progress
    assert "3 images" in page.text
    # The large view's facts are on the page for the script, and the plain link works without it.
    assert f'href="/console/jobs/{new}#image-0"' in page.text
    assert f'href="/console/jobs/{new}/images/0?download=1"' in page.text
    assert 'loading="lazy"' in page.text and "<dialog" in page.text
    assert 'aria-labelledby="lightbox-title"' in page.text
    # Another account's job cannot be asked for by the filter either.
    assert shown(http.get(GALLERY, params={"job": theirs})) == []


def test_an_account_without_images_sees_the_empty_state(instant_client):
    client = instant_client
    client.account("me@example.com")
    sign_in(client.http, "me@example.com")
    page = client.http.get(GALLERY)
    assert shown(page) == [] and "No images yet" in page.text and "<dialog" not in page.text
    assert "In progress" not in page.text
    filtered = client.http.get(GALLERY, params={"from": "2025-01-01"})
    assert "No image matches these filters" in filtered.text


def test_pages_hold_a_fixed_number_of_images_and_refuse_pages_past_the_end(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    me = client.account("me@example.com", credits=IMAGES_PER_PAGE + 5)
    first = made(db, me.id, [f"old {i}" for i in range(5)], "2025-01-01T00:00:00.000Z")
    second = made(db, me.id, [f"new {i}" for i in range(IMAGES_PER_PAGE)],
                  "2025-02-01T00:00:00.000Z")
    sign_in(http, "me@example.com")

    one = http.get(GALLERY)
    assert shown(one) == [(second, i) for i in range(IMAGES_PER_PAGE)]
    assert "Page 1 of 2" in one.text and 'href="/console/jobs?page=2"' in one.text
    two = http.get(GALLERY, params={"page": "2"})
    assert shown(two) == [(first, i) for i in range(5)]
    assert 'href="/console/jobs?page=1"' in two.text and "?page=3" not in two.text

    past = http.get(GALLERY, params={"page": "3"}, headers=HTML)
    assert past.status_code == 400 and "page 3 of 2" in past.text
    assert '<p class="alert error" role="alert">' in past.text  # the styled error page
    for bad in ("0", "-1", "1.5", "two", "٢", ""):
        assert http.get(GALLERY, params={"page": bad}, headers=HTML).status_code == 400, bad


def test_filters_by_job_key_and_days_alone_and_together_and_links_keep_them(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    me = client.account("me@example.com", credits=IMAGES_PER_PAGE + 10)
    live, _ = keys.create_key(db, me.id, "Live key", audit.Actor.cli())
    gone, _ = keys.create_key(db, me.id, "Old <b>key</b>", audit.Actor.cli())
    unused, _ = keys.create_key(db, me.id, "Never used", audit.Actor.cli())
    other = client.account("other@example.com")
    theirs, _ = keys.create_key(db, other.id, "Their key", audit.Actor.cli())
    jan = made(db, me.id, ["jan live"], "2025-01-31T23:59:59.999Z", live.id)
    feb = made(db, me.id, ["feb gone"], "2025-02-01T00:00:00.000Z", gone.id)
    mar = made(db, me.id, ["mar console"], "2025-03-15T12:00:00.000Z")
    many = made(db, me.id, [f"apr {i}" for i in range(IMAGES_PER_PAGE + 2)],
                "2025-04-02T08:00:00.000Z", live.id)
    keys.delete_key_by_id(db, me.id, gone.id, audit.Actor.cli())
    keys.delete_key_by_id(db, me.id, unused.id, audit.Actor.cli())
    sign_in(http, "me@example.com")

    def jobs(**params) -> list[str]:
        return list(dict.fromkeys(job for job, _ in shown(http.get(GALLERY, params=params))))

    assert jobs(job=feb) == [feb]
    assert jobs(key=str(live.id)) == [many]  # the first page: April's images only
    assert jobs(key=str(live.id), page="2") == [many, jan]
    assert jobs(key=str(gone.id)) == [feb]
    assert jobs(key=str(theirs.id)) == []
    # Whole UTC days, both ends included.
    assert jobs(**{"from": "2025-02-01", "to": "2025-03-15"}) == [mar, feb]
    assert jobs(**{"to": "2025-01-31"}) == [jan]
    assert jobs(**{"from": "2025-04-03"}) == []
    assert jobs(**{"from": "2025-01-01", "key": str(live.id), "job": jan}) == [jan]
    assert jobs(**{"from": "2025-02-01", "key": str(live.id), "job": jan}) == []

    # The key list: live keys, and a deleted key only while it has images to show.
    page = http.get(GALLERY, params={"key": str(live.id), "from": "2025-01-01"})
    options = re.findall(r'<option value="(\d+)"( selected)?>([^<]*)</option>', page.text)
    assert [(int(key_id), bool(chosen)) for key_id, chosen, _ in options] == [
        (live.id, True), (gone.id, False)]
    assert "Old &lt;b&gt;key&lt;/b&gt;" in options[1][2] and "deleted" in options[1][2]
    assert "Never used" not in page.text and "Their key" not in page.text
    assert 'value="2025-01-01"' in page.text
    # The pager's links keep the filters.
    assert f'href="/console/jobs?key={live.id}&amp;from=2025-01-01&amp;page=2"' in page.text
    # Each image says which key made it; the playground's say none did.
    assert page.text.count('<dd data-field="key">Live key</dd>') == IMAGES_PER_PAGE
    console_only = http.get(GALLERY, params={"job": mar}).text
    assert '<dd data-field="key">none (playground)</dd>' in console_only


def test_bad_filter_values_get_the_styled_400_page(instant_client):
    client = instant_client
    client.account("me@example.com")
    sign_in(client.http, "me@example.com")
    for params, said in (
            ({"from": "yesterday"}, "&#39;from&#39; must be a date such as 2025-01-31"),
            ({"to": "2025-02-30"}, "&#39;to&#39; must be a date"),
            ({"from": "20250131"}, "&#39;from&#39; must be a date"),
            ({"from": "2025-W05-1"}, "&#39;from&#39; must be a date"),
            ({"from": "2025-03-01", "to": "2025-02-01"}, "&#39;from&#39; date is after"),
            ({"job": "not-a-job"}, "&#39;job&#39; must be a job id"),
            ({"job": "3F2C0000-0000-4000-8000-000000000000"}, "&#39;job&#39; must be a job id"),
            ({"key": "1_0"}, "&#39;key&#39; must be one of your keys"),
            ({"key": "9" * 40}, "&#39;key&#39; must be one of your keys")):
        answer = client.http.get(GALLERY, params=params, headers=HTML)
        assert answer.status_code == 400, params
        assert said in answer.text and 'class="alert error"' in answer.text, params
    # A script asking gets the same refusal as JSON.
    refused = client.http.get(GALLERY, params={"from": "yesterday"})
    assert refused.status_code == 400 and "must be a date" in refused.json()["error"]


def test_the_large_view_names_the_model_and_adapters_that_made_the_image(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    me = client.account("me@example.com")
    styled = store.GenerationSettings(**TEST_GENERATION, model="second",
                                      loras=(("ink", 0.75), ("watercolor", 1.0)))
    new = made(db, me.id, ["a styled fox"], "2025-03-01T10:00:00.000Z", settings=styled)
    # Stored before there were several models: no model is named, so none is shown.
    old = made(db, me.id, ["an old fox"], "2025-01-01T10:00:00.000Z")
    sign_in(http, "me@example.com")
    page = http.get(GALLERY).text
    facts = page.split("data-lightbox-facts hidden>")[1:]
    assert len(facts) == 2 and "a styled fox" in facts[0] and "an old fox" in facts[1]
    assert '<dt>Model</dt><dd data-field="model">second</dd>' in facts[0]
    assert (f'<dt>LoRA</dt><dd data-field="loras">ink {TIMES} 0.75, watercolor {TIMES} 1.0</dd>'
            in facts[0])
    assert "<dt>Model</dt>" not in facts[1] and "<dt>LoRA</dt>" not in facts[1]
    job_page = http.get(f"/console/jobs/{new}").text
    assert job_page.count('<dd data-field="model">second</dd>') == 2  # the job and its image
    assert "<dt>Model</dt>" not in http.get(f"/console/jobs/{old}").text


def test_prompts_are_shown_as_text_never_as_markup(instant_client):
    client = instant_client
    http, db = client.http, client.database.db()
    me = client.account("me@example.com")
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    settings = store.GenerationSettings(**{**TEST_GENERATION,
                                           "negative_prompt": "</dd><script>bad()</script>"})
    job = made(db, me.id, [hostile], "2025-01-01T00:00:00.000Z", settings=settings)
    sign_in(http, "me@example.com")
    for path in (GALLERY, f"/console/jobs/{job}"):
        text = http.get(path).text
        assert "<script>alert" not in text and "<script>bad" not in text
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text
        assert "&lt;/dd&gt;&lt;script&gt;bad()&lt;/script&gt;" in text
        assert "<script>" not in text and "style=" not in text


def test_the_download_link_answers_with_an_attachment(instant_client):
    client = instant_client
    http = client.http
    me = client.account("me@example.com")
    key = client.key(me)
    job_id = http.post(API, json={"prompts": ["a red square"]}, headers=bearer(key)).json()["jobId"]
    client.wait_for_job(key, job_id)
    sign_in(http, "me@example.com")
    assert shown(http.get(GALLERY)) == [(job_id, 0)]

    download = http.get(f"/console/jobs/{job_id}/images/0", params={"download": "1"})
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert download.headers["content-disposition"] == (
        f'attachment; filename="{job_id}-0.png"')
    assert download.content.startswith(b"\x89PNG")
    inline = http.get(f"/console/jobs/{job_id}/images/0")
    assert inline.headers["content-disposition"].startswith("inline")
    # The job page opens the same large view, with its own facts.
    job_page = http.get(f"/console/jobs/{job_id}").text
    assert 'id="image-0" data-lightbox-item' in job_page and "<dialog" in job_page
    assert f'href="/console/jobs/{job_id}/images/0?download=1"' in job_page



@pytest.mark.sqlite_only
def test_the_gallery_reads_only_the_accounts_jobs_never_every_image(database):
    """The index on status alone holds every account's images; the gallery must start
    from the account's jobs, or each page would read the whole appliance's images."""
    db = database.db()
    statements: list[str] = []
    db.conn.set_trace_callback(statements.append)
    store.gallery_images(db, 1, store.GalleryFilter(), limit=48, offset=0)
    db.conn.set_trace_callback(None)
    (query,) = [sql for sql in statements if "FROM jobs j" in sql]
    plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {query}"))
    assert "jobs_account (account_id=?)" in plan and "job_images_status" not in plan, plan
    assert "RIGHT PART OF ORDER BY" in plan, plan  # sorted job by job: the page can stop early
