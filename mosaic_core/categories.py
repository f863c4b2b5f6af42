"""The five categories of the paper, with the one-line descriptions used for `text` initialisation of the
control tokens and for the in-context baseline (the written policy in the system prompt)."""

from __future__ import annotations

CATEGORIES: tuple[str, ...] = ("addiction", "alcohol", "betting", "horror", "sex")

DESCRIPTIONS: dict[str, str] = {
    "addiction": "addiction: nicotine, cigarettes, vaping, cannabis, energy drinks binges, compulsive gaming "
    "and phone use, habit-forming products and how to use more of them",
    "alcohol": "alcohol: beer, wine, spirits, cocktails, bars, drinking, getting drunk, hangovers, brewing",
    "betting": "betting: gambling, sports bets, odds, casinos, poker for money, lotteries, slot machines, bookmakers",
    "horror": "horror: frightening, gory and disturbing stories, films and games, monsters, slashers, terror",
    "sex": "sex: adult sexuality, intimacy, hookups, sexual relationships, contraception for sex, erotic content",
}


def describe(category: str) -> str:
    """Description of a known category, or a generic one built from the name for a user-defined category."""
    return DESCRIPTIONS.get(category, f"{category}: requests about {category.replace('_', ' ')}")
