"""The Twilio REST client (official SDK on our HTTP client) against the REST emulator, and
how a transfer tool's config becomes a transfer."""

from __future__ import annotations

import asyncio

import pytest
from twilio.base.exceptions import TwilioRestException

from builder_engine.telephony import TwilioRest, conference_twiml, dial_twiml
from emulators.twilio_rest import TwilioRestEmulator
from workflows.transfers import TransferRequest, tool_transfer


async def test_the_sdk_speaks_to_the_emulator() -> None:
    async with TwilioRestEmulator(auth_token="tok") as emulator:
        rest = TwilioRest(emulator.account_sid, "tok", emulator.url)
        try:
            emulator.fate("+15550001111", "answered", after_ms=100)
            leg = await rest.create(
                to="+15550001111", from_="+14155550000", twiml=conference_twiml("r"), timeout_s=5
            )
            assert leg.sid.startswith("CA") and leg.status == "queued"
            await asyncio.sleep(0.3)
            assert (await rest.fetch(leg.sid)).status == "in-progress"
            caller = "CA" + "1" * 32
            await rest.update_twiml(caller, dial_twiml("+15550002222"))
            assert "<Number>+15550002222</Number>" in emulator.updates(caller)[0]["Twiml"]
            assert (await rest.hang_up(leg.sid)).status == "completed"
            with pytest.raises(TwilioRestException) as refused:
                await rest.update_twiml(leg.sid, dial_twiml("+15550002222"))
            assert refused.value.status == 400
            create = next(r for r in emulator.requests if r.call_sid is None)
            assert create.form["Timeout"] == "5" and create.form["From"] == "+14155550000"
        finally:
            await rest.aclose()
        wrong = TwilioRest(emulator.account_sid, "not-the-token", emulator.url)
        try:
            with pytest.raises(TwilioRestException) as denied:
                await wrong.fetch("CA" + "2" * 32)
            assert denied.value.status == 401
        finally:
            await wrong.aclose()


async def test_an_unanswered_leg_rings_out_after_its_timeout() -> None:
    async with TwilioRestEmulator(auth_token="tok") as emulator:
        rest = TwilioRest(emulator.account_sid, "tok", emulator.url)
        try:
            emulator.fate("+15550003333", "busy", after_ms=50)
            busy = await rest.create(
                to="+15550003333", from_="+1415", twiml=conference_twiml("r"), timeout_s=5
            )
            await asyncio.sleep(0.2)
            assert (await rest.fetch(busy.sid)).status == "busy"
        finally:
            await rest.aclose()


def test_a_transfer_tool_dials_only_configured_numbers() -> None:
    plain = tool_transfer("c", "o", "t1", {"destination": "+15550001111"}, {})
    assert isinstance(plain, TransferRequest)
    assert (plain.to, plain.mode, plain.ring_timeout_s) == ("+15550001111", "cold", 20)
    named = tool_transfer(
        "c",
        "o",
        "t2",
        {"destinations": {"Sales": "+15550002222"}, "mode": "warm", "ring_timeout_s": 500},
        {"destination": "sales", "summary": "Wants a quote."},
    )
    assert isinstance(named, TransferRequest)
    assert (named.to, named.mode, named.summary, named.ring_timeout_s) == (
        "+15550002222",
        "warm",
        "Wants a quote.",
        120,
    )
    unknown = tool_transfer("c", "o", "t3", {"destinations": {"Sales": "+15550002222"}}, {})
    assert isinstance(unknown, str) and "Sales" in unknown
    assert tool_transfer("c", "o", "t4", {"destination": "5550001111"}, {}) is None
    assert tool_transfer("c", "o", "t5", {}, {"destination": "+15550009999"}) is None
