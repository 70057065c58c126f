"""Registers ``twistd mailplat``; the service itself lives in mailplat.service."""

from twisted.application.service import ServiceMaker

mailplat = ServiceMaker(
    "mailplat",
    "mailplat.service",
    "A pluggable mail platform: SMTP, submission, relay queue and POP3.",
    "mailplat",
)
