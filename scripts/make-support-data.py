#!/usr/bin/env python3
"""Writes examples/data/customer-support.jsonl: a small, deterministic customer-support chat dataset.

Each row is {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} (format 'chat').
The conversations are built from templates so the data can be regenerated exactly; run this script again after
changing a template.
"""

import json
import random
from pathlib import Path

SYSTEM = "You are the support assistant of Acme Store. Be brief, friendly and exact."
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Liam",
    "Mia",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yara",
    "Zoe",
]
PRODUCTS = [
    "headphones",
    "desk lamp",
    "coffee grinder",
    "backpack",
    "keyboard",
    "water bottle",
    "running shoes",
    "phone case",
    "blender",
    "office chair",
    "monitor stand",
    "yoga mat",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]

TOPICS = [
    (
        [
            "Where is my order {order}?",
            "Can you tell me the status of order {order}?",
            "My order {order} hasn't arrived yet.",
        ],
        [
            "Order {order} ({product}) shipped on {day} and should arrive within 3 business days. "
            "You can follow it with the tracking link in your confirmation email."
        ],
    ),
    (
        ["I want to return my {product}.", "How do I send back the {product} I bought?", "Can I return a {product}?"],
        [
            "You can return the {product} within 30 days of delivery. Go to Orders, choose Return item, and print the "
            "free return label. The refund reaches your card 5 to 7 days after we receive it."
        ],
    ),
    (
        ["I forgot my password.", "How can I reset my password?", "I can't log in to my account."],
        [
            "Click Forgot password on the sign-in page and enter your email. The reset link is valid for 30 minutes; "
            "check your spam folder if it does not arrive."
        ],
    ),
    (
        ["Do you ship to {country}?", "Can I get delivery in {country}?", "How long does shipping to {country} take?"],
        [
            "Yes, we ship to {country}. Standard delivery takes 5 to 8 business days and costs 9 euros; it is free "
            "for orders over 60 euros."
        ],
    ),
    (
        ["My {product} arrived broken.", "The {product} I received is damaged.", "My {product} stopped working."],
        [
            "I'm sorry about your {product}. Send us a photo at help@acme.example with order {order} and we will ship "
            "a replacement at no cost, or refund you if you prefer."
        ],
    ),
    (
        ["Can I change the address for order {order}?", "I need to update the delivery address of {order}."],
        [
            "If order {order} has not shipped yet, open it under Orders and choose Edit address. Once it has shipped, "
            "reply here with the new address and we will ask the carrier to redirect it."
        ],
    ),
    (
        ["When will the refund for {order} arrive?", "I returned my {product} but got no refund yet."],
        [
            "Refunds are issued within 2 business days after the return is scanned at our warehouse, and your bank "
            "takes 5 to 7 days to show them. Order {order} is being processed now."
        ],
    ),
    (
        ["Do you have a discount code?", "Are there any promotions right now?"],
        ["Sign up for our newsletter and you get 10 percent off your next order. We do not share codes in chat."],
    ),
    (
        ["How do I cancel order {order}?", "Please cancel my order {order}."],
        [
            "Order {order} can be cancelled under Orders with Cancel order until it ships. If the button is missing, "
            "it has already shipped and you can return it for free instead."
        ],
    ),
    (
        ["What are your opening hours?", "When is customer support available?"],
        ["Our support team answers from Monday to Friday, 8:00 to 20:00, and on Saturday from 9:00 to 14:00."],
    ),
]
COUNTRIES = ["France", "Germany", "Spain", "Italy", "Portugal", "Poland", "Ireland", "Norway", "Austria"]


def conversation(rng: random.Random) -> dict:
    questions, answers = rng.choice(TOPICS)
    slots = {
        "order": f"A{rng.randint(10000, 99999)}",
        "product": rng.choice(PRODUCTS),
        "day": rng.choice(DAYS),
        "country": rng.choice(COUNTRIES),
    }
    name = rng.choice(NAMES)
    question = rng.choice(questions).format(**slots)
    greeting = rng.choice(["Hi, ", "Hello, ", "", "Good morning, "])
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{greeting}{question} - {name}"},
        {"role": "assistant", "content": f"Hi {name}! " + rng.choice(answers).format(**slots)},
    ]
    if rng.random() < 0.3:
        messages += [
            {"role": "user", "content": rng.choice(["Thanks!", "Great, thank you.", "Perfect."])},
            {"role": "assistant", "content": "You're welcome! Anything else I can help with?"},
        ]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(1234)
    out = Path(__file__).resolve().parent.parent / "examples" / "data" / "customer-support.jsonl"
    with out.open("w") as f:
        for _ in range(600):
            f.write(json.dumps(conversation(rng)) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
