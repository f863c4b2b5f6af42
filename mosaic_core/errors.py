"""Typed errors. Every failure a user can cause maps to one of these; the edges (CLI, HTTP) map them to
one clear message or one OpenAI-shaped error body."""

from __future__ import annotations


class MosaicError(Exception):
    """Base class: a user-facing error whose message says what is wrong and how to fix it."""


class ConfigError(MosaicError, ValueError):
    """A configuration is invalid. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str], where: str = "config") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {where} ({len(self.problems)} problem(s)):\n{lines}")


class UnknownCategoryError(MosaicError, KeyError):
    """A request named a category (module) the bank does not hold. HTTP 400 at the serving edge."""

    def __init__(self, unknown: list[str], known: list[str]) -> None:
        self.unknown, self.known = list(unknown), list(known)
        super().__init__(f"unknown safety module(s) {self.unknown}; available: {self.known}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class DuplicateCategoryError(MosaicError, ValueError):
    """A category was registered twice in one bank."""


class ArtifactError(MosaicError):
    """A module artifact cannot be used: missing files, bad hash, wrong backbone, unknown format."""


class IntegrityError(ArtifactError):
    """A module file's sha256 does not match the one recorded in its module.json."""


class IncompatibleBackboneError(ArtifactError):
    """A module was trained on a different backbone (fingerprints differ)."""


class BackboneError(MosaicError):
    """A backbone spec cannot be resolved or loaded."""


class DatasetError(MosaicError, ValueError):
    """The request dataset is malformed (missing columns, unknown kind, empty split...)."""
