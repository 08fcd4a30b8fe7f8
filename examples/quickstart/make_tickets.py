"""Writes tickets.jsonl: support tickets for the quick start's triage task, the same bytes every run.

Each row is {"id", "prompt", "reference"}: the prompt is the ticket as a customer wrote it, the
reference its label. References are used only to score the held-out rows; the teacher labels every
ticket itself and curation keeps the answers the teacher's own samples agree on.

    python examples/quickstart/make_tickets.py [--out examples/quickstart/tickets.jsonl] [--n 300]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LABELS = ("billing", "bug", "account", "feature_request", "shipping")
SEED = 20261129

SLOTS: dict[str, tuple[str, ...]] = {
    "amount": ("$12.99", "$49.00", "$7.50", "$120", "$19.99", "$250.00", "€35", "£18.40"),
    "month": ("January", "March", "May", "August", "October", "December"),
    "plan": ("Pro", "Team", "Basic", "Enterprise", "Starter"),
    "feature": (
        "dark mode",
        "an export to CSV",
        "two-factor login with a hardware key",
        "a calendar view",
        "bulk editing",
        "keyboard shortcuts",
        "a Slack integration",
        "an API for reports",
    ),
    "screen": ("dashboard", "settings page", "checkout", "search results", "upload dialog", "reports tab"),
    "error": (
        "error 500",
        "a blank white page",
        "'Something went wrong'",
        "a spinning wheel forever",
        "error 0x80",
    ),
    "device": ("iPhone", "Android phone", "Windows laptop", "Mac", "Chromebook", "iPad"),
    "browser": ("Chrome", "Firefox", "Safari", "Edge"),
    "item": (
        "headphones",
        "desk lamp",
        "running shoes",
        "coffee grinder",
        "blue backpack",
        "phone case",
        "monitor",
    ),
    "days": ("three", "five", "ten", "two", "six"),
    "carrier": ("UPS", "FedEx", "DHL", "the postal service"),
    "city": ("Lyon", "Denver", "Osaka", "Leeds", "Porto", "Austin"),
    "name": ("Dana", "Sam", "Priya", "Luis", "Mei", "Tom", "Aisha", "Olga"),
}
GREETINGS = ("", "", "Hi! ", "Hello. ", "Hello team! ", "Urgent: ", "Good morning. ")
SIGN_OFFS = ("", "", " Thanks.", " Thank you!", " Regards, {name}", " Please help.", " - {name}")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged {amount} twice this month. Please refund the duplicate payment.",
        "Why did my invoice for {month} go up to {amount}? I did not change my {plan} plan.",
        "My card was billed {amount} after I cancelled the {plan} plan. I want my money back.",
        "Can you send me a receipt for the {amount} payment from {month}? I need it for taxes.",
        "The price of the {plan} plan shows {amount} but I was charged more. Please fix the bill.",
        "I need to update the credit card used for my subscription payments before {month}.",
        "There is an unknown charge of {amount} on my statement from your company.",
        "Please switch me to yearly billing and tell me how the {amount} I already paid is credited.",
    ),
    "bug": (
        "The {screen} shows {error} every time I open it in {browser}.",
        "Since the last update the app crashes on my {device} when I tap the {screen}.",
        "When I click save on the {screen} nothing happens and I get {error}.",
        "The {screen} freezes with {error} on my {device}. It worked fine yesterday.",
        "Uploading a file fails with {error} in {browser}; I tried three times.",
        "Numbers on the {screen} are wrong after I refresh the page in {browser}.",
        "The app keeps logging me out on the {screen} and then shows {error}.",
        "Buttons on the {screen} overlap and cannot be clicked on my {device}.",
    ),
    "account": (
        "I forgot my password and the reset email never arrives. My name is {name}.",
        "Please change the email address on my account; {name} left the company.",
        "How do I delete my account and all of my data?",
        "I am locked out of my account after too many login attempts on my {device}.",
        "Can you merge my two accounts? I signed up twice as {name}.",
        "I want to add {name} as a second user with admin rights on my profile.",
        "My username was changed without my permission. Please secure my account.",
        "Two-factor codes stopped working after I replaced my {device}; I cannot sign in.",
    ),
    "feature_request": (
        "It would be great if you added {feature}. We would use it every day.",
        "Please consider {feature}; our team of {days} people keeps asking for it.",
        "Any plans to support {feature}? Other tools we use already have it.",
        "Suggestion: {feature} would make the {screen} much more useful.",
        "I would pay extra on the {plan} plan for {feature}.",
        "Could you build {feature}? Right now we work around it by hand.",
        "Idea for the roadmap: {feature} on the {device} app.",
        "We love the product. The one thing missing for us is {feature}.",
    ),
    "shipping": (
        "My order of {item} has not arrived after {days} weeks. Where is it?",
        "The tracking number from {carrier} does not work for my {item}.",
        "The package with my {item} was delivered to the wrong address in {city}.",
        "Can I change the delivery address for my {item} order to {city}?",
        "{carrier} says my {item} was delivered but I never got the package.",
        "My {item} arrived broken in a crushed box. What should I do?",
        "How long does shipping to {city} take? I need the {item} within {days} days.",
        "The order with my {item} shows 'label created' for {days} days and never moves.",
    ),
}


def fill(template: str, rng: random.Random) -> str:
    text = rng.choice(GREETINGS) + template + rng.choice(SIGN_OFFS)
    values = {key: rng.choice(options) for key, options in SLOTS.items() if "{" + key + "}" in text}
    text = text.format(**values)
    return text[0].upper() + text[1:]


def make_rows(n: int, seed: int = SEED) -> list[dict[str, str]]:
    """n distinct tickets, labels in turn so each gets the same share, texts from the seeded generator.

    Distinct texts, because the held-out split goes by id: a duplicate could sit on both sides.
    """
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        label = LABELS[len(rows) % len(LABELS)]
        text = fill(rng.choice(TEMPLATES[label]), rng)
        if text not in seen:
            seen.add(text)
            rows.append({"id": f"ticket-{len(rows):04d}", "prompt": text, "reference": label})
    rng.shuffle(rows)
    return rows


def render(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tickets.jsonl"))
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    args.out.write_text(render(make_rows(args.n)), encoding="utf-8")
    print(f"wrote {args.n} tickets to {args.out}")


if __name__ == "__main__":
    main()
