"""The dashboard's usage pictures: images a day and credits per API key, with their numbers."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

from appliance.accounts import audit, keys
from appliance.core.clock import utc_clock, utc_iso
from appliance.core.database import immediate
from appliance.jobs import store, usage
from appliance.jobs.models import GenerationSettings

from .console_helpers import HTML, sign_in

SETTINGS = GenerationSettings(64, 64, 2, 7.5)


def at_noon(day: date) -> datetime:
    return datetime.combine(day, time(12), UTC)


def made_job(db, account_id: int, key_id: int | None, images: int, created: datetime,
             completed: int = 0, finished: datetime | None = None, failed: int = 0) -> str:
    """A job written and charged as the API does, then ended as of the given times."""
    with immediate(db):  # one committed transaction: the app reads it from other connections
        job = store.submit(db, account_id, key_id, [f"prompt {n}" for n in range(images)],
                           SETTINGS)
        db.execute("UPDATE jobs SET created_at = ? WHERE id = ?", [utc_iso(created), job.job_id])
        if failed:
            store.mark_failed(db, job.images[:failed], "the test failed it")
        done = job.images[failed:failed + completed]
        if done:
            store.mark_completed(db, done)
            db.executemany("UPDATE job_images SET finished_at = ? WHERE id = ?",
                                [(utc_iso(finished or created), image.image_id) for image in done])
            db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?",
                       [utc_iso(finished or created), job.job_id])
    return job.job_id


def section(page: str, testid: str) -> str:
    start = page.index(f'data-testid="{testid}"')
    return page[start:page.index("</figure>", start)]


def number_rows(html: str) -> list[list[str]]:
    """The cells of each row of the section's "Show numbers" table, tags stripped."""
    body = html[html.index("<tbody>"):html.index("</tbody>")]
    return [[re.sub(r"<[^>]+>", "", cell).strip()
             for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_the_dashboard_shows_the_accounts_images_a_day_and_credits_per_key(instant_client):
    client = instant_client
    db = client.database.db()
    me = client.account("me@example.com", credits=40)
    other = client.account("other@example.com", credits=40)
    production, _ = keys.create_key(db, me.id, "Production", audit.Actor.cli())
    old, _ = keys.create_key(db, me.id, "Old key", audit.Actor.cli())
    stranger, _ = keys.create_key(db, other.id, "Stranger key", audit.Actor.cli())
    today = utc_clock().date()

    # Three images today through Production, one of which failed and was refunded.
    made_job(db, me.id, production.id, 3, at_noon(today), completed=2, failed=1)
    made_job(db, me.id, production.id, 2, at_noon(today - timedelta(days=2)), completed=2)
    # The oldest day in the window, through a key deleted since.
    made_job(db, me.id, old.id, 1, at_noon(today - timedelta(days=29)), completed=1)
    keys.delete_key_by_id(db, me.id, old.id, audit.Actor.cli())
    # Outside the window: made 35 days ago, finished 30 days ago.
    made_job(db, me.id, production.id, 4, at_noon(today - timedelta(days=35)), completed=4,
             finished=at_noon(today - timedelta(days=30)))
    # The playground (no key): cancelled before it started, so refunded in full.
    cancelled = made_job(db, me.id, None, 1, at_noon(today))
    assert store.cancel(db, me.id, cancelled) == 1
    # Another account's work, today: never on this dashboard.
    made_job(db, other.id, stranger.id, 5, at_noon(today), completed=5)

    sign_in(client.http, "me@example.com")
    page = client.http.get("/console", headers=HTML)
    assert page.status_code == 200
    text = page.text

    days = section(text, "images-per-day")
    expected = {today: 2, today - timedelta(days=2): 2, today - timedelta(days=29): 1}
    shown = number_rows(days)
    # Every one of the 30 days, newest first, the days without images as zeros.
    assert shown == [[(today - timedelta(days=n)).isoformat(),
                      str(expected.get(today - timedelta(days=n), 0))] for n in range(30)]
    assert "<strong>5</strong> in all" in days
    # The chart: one column a day, its number in the hover title, zeros drawn as zeros.
    chart = days[days.index("<svg"):days.index("</svg>")]
    assert chart.count('<g class="column">') == 30
    assert f"<title>{today.isoformat()}: 2 images</title>" in chart
    assert f"<title>{(today - timedelta(days=29)).isoformat()}: 1 image</title>" in chart
    assert chart.count('class="bar zero"') == 27
    assert "style=" not in chart and "<script" not in chart

    spend = section(text, "credits-per-key")
    assert "less refunds for failed or cancelled images: <strong>5</strong> in all" in spend
    assert number_rows(spend) == [
        [f"Production {production.prefix}…", "5", "4"],  # 3 + 2 asked, one refunded
        [f"Old key {old.prefix}… (deleted)", "1", "1"],
        ["Playground (no key)", "1", "0"],
    ]
    assert spend.count('<svg class="meter"') == 3
    assert "<title>Production: 4 credits</title>" in spend
    # Nothing of the other account's.
    assert "Stranger key" not in text and stranger.prefix not in text


def test_a_new_account_sees_thirty_zero_days_and_no_spend(instant_client):
    client = instant_client
    client.account("new@example.com", credits=3)
    sign_in(client.http, "new@example.com")
    text = client.http.get("/console", headers=HTML).text
    days = number_rows(section(text, "images-per-day"))
    assert len(days) == 30 and {count for _, count in days} == {"0"}
    assert "No credits spent in the last 30 days." in section(text, "credits-per-key")


def test_the_window_runs_from_the_first_days_midnight_to_today(instant_client):
    client = instant_client
    db = client.database.db()
    me = client.account("edge@example.com", credits=10)
    today = date(2025, 1, 31)
    first = today - timedelta(days=usage.USAGE_DAYS - 1)  # 2025-01-02
    just_before = datetime.combine(first, time(0), UTC) - timedelta(milliseconds=1)
    made_job(db, me.id, None, 1, just_before, completed=1)
    made_job(db, me.id, None, 2, datetime.combine(first, time(0), UTC), completed=2)
    made_job(db, me.id, None, 1, datetime.combine(today, time(23, 59, 59), UTC), completed=1)

    per_day = usage.images_per_day(db, me.id, today)
    assert [d.day for d in per_day] == [first + timedelta(days=n) for n in range(30)]
    assert (per_day[0].images, per_day[-1].images, sum(d.images for d in per_day)) == (2, 1, 3)
    (playground,) = usage.credits_per_key(db, me.id, today)
    assert (playground.key_id, playground.images, playground.credits) == (None, 3, 3)
