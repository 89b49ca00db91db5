"""The dashboard's pictures of an account's usage, made from JobService.usage."""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup

from appliance.jobs.service import Usage
from appliance.jobs.usage import DayImages, KeySpend
from appliance.web.console.charts import Bar, column_chart, meter


def images_word(count: int) -> str:
    return f"{count} image{'s' * (count != 1)}"


@dataclass(frozen=True)
class KeyRow:
    spend: KeySpend
    bar: Markup


@dataclass(frozen=True)
class UsagePictures:
    days: int
    per_day: list[DayImages]
    total_images: int
    busiest: int
    day_chart: Markup
    keys: list[KeyRow]
    total_credits: int


def usage_pictures(usage: Usage) -> UsagePictures:
    per_day = usage.images_per_day
    total = sum(day.images for day in per_day)
    chart = column_chart(
        [Bar(day.images, f"{day.day.isoformat()}: {images_word(day.images)}") for day in per_day],
        summary=f"Images made a day over the last {usage.days} days: {total} in all",
        name="images-per-day")
    largest = max((spend.credits for spend in usage.credits_per_key), default=0)
    keys = [KeyRow(spend, meter(spend.credits, largest, f"{spend.name}: {spend.credits} credits"))
            for spend in usage.credits_per_key]
    return UsagePictures(usage.days, per_day, total, max((d.images for d in per_day), default=0),
                         chart, keys, sum(spend.credits for spend in usage.credits_per_key))
