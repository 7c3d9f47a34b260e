"""Agents through the API: create, validate, version, publish, roll back, delete, paginate."""

from __future__ import annotations

from typing import Any

from conftest import ApiHarness

AGENT: dict[str, Any] = {
    "name": "Front desk",
    "first_message": "Hello, thanks for calling {{business}}.",
    "first_speaker": "agent",
    "language": "en",
    "brain": {
        "kind": "llm",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "base_url": None,
        "system_prompt": "You answer calls for {{business}}.",
        "temperature": 0.4,
        "fallback": None,
    },
    "asr": {"provider": "deepgram", "model": "nova-3"},
    "tts": {"provider": "elevenlabs", "voice": "rachel"},
    "turn": {"endpointing_ms": 200, "interrupt_min_ms": 250, "interrupt_min_words": 2},
    "silence_timeout_s": 15,
    "max_duration_s": 600,
    "end_call_phrases": ["goodbye"],
    "tools": [],
    "analysis": {"summary": True},
    "webhook_url": None,
    "variables": {"business": "Acme Dental"},
}


async def _create(api: ApiHarness, **overrides: Any) -> dict[str, Any]:
    response = await api.acme.client.post("/v1/agents", json={**AGENT, **overrides})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_create_returns_id_version_and_the_config(api: ApiHarness) -> None:
    body = await _create(api)
    assert body["id"].startswith("agt_")
    assert body["version"] == 1
    assert body["published_version"] == 1
    assert body["brain"]["temperature"] == 0.4
    assert body["turn"]["endpointing_ms"] == 200
    assert body["variables"] == {"business": "Acme Dental"}
    fetched = (await api.acme.client.get(f"/v1/agents/{body['id']}")).json()
    assert fetched == body


async def test_minimal_agent_gets_defaults(api: ApiHarness) -> None:
    body = await _create(api, **{k: v for k, v in AGENT.items() if k == "name"})
    response = await api.acme.client.post("/v1/agents", json={"name": "Minimal"})
    assert response.status_code == 201
    body = response.json()
    assert body["first_speaker"] == "agent"
    assert body["asr"]["provider"] == "deepgram"
    assert body["tts"]["provider"] == "elevenlabs"


async def test_invalid_configs_are_422_naming_the_field(api: ApiHarness) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"brain": {**AGENT["brain"], "temperature": 5}}, "brain.temperature"),
        ({"asr": {"provider": "nonexistent"}}, "asr.provider"),
        ({"tts": {"provider": "elevenlabs", "voice": "x", "colour": "red"}}, "tts.colour"),
        (
            {"brain": {**AGENT["brain"], "system_prompt": "Hi {{ not valid }}"}},
            "brain.system_prompt",
        ),
        ({"first_speaker": "caller"}, "first_message"),
        ({"turn": {"endpointing_ms": -1}}, "turn.endpointing_ms"),
        ({"language": "English!"}, "language"),
        ({"webhook_url": "not a url"}, "webhook_url"),
        (
            {"analysis": {"structured_data_schema": {"type": "string"}}},
            "analysis.structured_data_schema",
        ),
        ({"tools": ["tool_doesnotexist"]}, "tools.0"),
        ({"name": ""}, "name"),
    ]
    for overrides, field in cases:
        response = await api.acme.client.post("/v1/agents", json={**AGENT, **overrides})
        assert response.status_code == 422, (overrides, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["status"] == 422
        assert problem["title"] == "Unprocessable Content"
        assert field in [e["field"] for e in problem["errors"]], (field, problem)


async def test_malformed_json_is_a_problem(api: ApiHarness) -> None:
    response = await api.acme.client.post(
        "/v1/agents", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["type"].endswith("/validation-error")


async def test_every_update_is_a_new_version_and_publish_rolls_back(api: ApiHarness) -> None:
    agent = await _create(api)
    agent_id = agent["id"]
    client = api.acme.client

    patched = await client.patch(f"/v1/agents/{agent_id}", json={"brain": {"temperature": 0.1}})
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["version"] == 2
    assert body["published_version"] == 1  # drafts are not live until published
    assert body["brain"]["temperature"] == 0.1
    assert body["brain"]["system_prompt"] == AGENT["brain"]["system_prompt"]  # merged

    replaced = await client.put(
        f"/v1/agents/{agent_id}", params={"publish": "true"}, json={**AGENT, "name": "Renamed"}
    )
    assert replaced.json()["version"] == 3
    assert replaced.json()["published_version"] == 3
    assert replaced.json()["name"] == "Renamed"

    v1 = (await client.get(f"/v1/agents/{agent_id}/versions/1")).json()
    assert v1["config"]["brain"]["temperature"] == 0.4
    assert v1["published"] is False
    versions = (await client.get(f"/v1/agents/{agent_id}/versions")).json()
    assert [v["version"] for v in versions["data"]] == [3, 2, 1]
    assert [v["published"] for v in versions["data"]] == [True, False, False]

    rolled_back = await client.post(f"/v1/agents/{agent_id}/publish", json={"version": 1})
    assert rolled_back.status_code == 200
    assert rolled_back.json()["published_version"] == 1
    assert rolled_back.json()["version"] == 3

    latest = await client.post(f"/v1/agents/{agent_id}/publish")
    assert latest.json()["published_version"] == 3

    missing = await client.post(f"/v1/agents/{agent_id}/publish", json={"version": 99})
    assert missing.status_code == 404

    bad_patch = await client.patch(f"/v1/agents/{agent_id}", json={"turn": {"endpointing_ms": 0}})
    assert bad_patch.status_code == 422
    assert bad_patch.json()["errors"][0]["field"] == "turn.endpointing_ms"
    assert (await client.get(f"/v1/agents/{agent_id}")).json()["version"] == 3


async def test_version_history_pages(api: ApiHarness) -> None:
    agent = await _create(api)
    for temperature in (0.1, 0.2, 0.3):
        await api.acme.client.patch(
            f"/v1/agents/{agent['id']}", json={"brain": {"temperature": temperature}}
        )
    first = (await api.acme.client.get(f"/v1/agents/{agent['id']}/versions?limit=3")).json()
    assert [v["version"] for v in first["data"]] == [4, 3, 2]
    second = (
        await api.acme.client.get(
            f"/v1/agents/{agent['id']}/versions",
            params={"limit": 3, "cursor": first["next_cursor"]},
        )
    ).json()
    assert [v["version"] for v in second["data"]] == [1]
    assert second["next_cursor"] is None


async def test_list_paginates_and_filters(api: ApiHarness) -> None:
    marker = "Paginated"
    created = [(await _create(api, name=f"{marker} {i}"))["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "name": marker.lower()}
        if cursor:
            params["cursor"] = cursor
        page = (await api.acme.client.get("/v1/agents", params=params)).json()
        seen.extend(a["id"] for a in page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))
    bad = await api.acme.client.get("/v1/agents", params={"cursor": "garbage!"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "cursor"


async def test_soft_delete(api: ApiHarness) -> None:
    agent = await _create(api)
    deleted = await api.acme.client.delete(f"/v1/agents/{agent['id']}")
    assert deleted.status_code == 204
    assert (await api.acme.client.get(f"/v1/agents/{agent['id']}")).status_code == 404
    assert (await api.acme.client.get(f"/v1/agents/{agent['id']}/versions/1")).status_code == 404
    listed = (await api.acme.client.get("/v1/agents", params={"limit": 100})).json()
    assert agent["id"] not in [a["id"] for a in listed["data"]]
    assert (await api.acme.client.delete(f"/v1/agents/{agent['id']}")).status_code == 404


async def test_agent_with_tools_by_reference(api: ApiHarness) -> None:
    tool = await api.acme.client.post(
        "/v1/tools",
        json={
            "name": "lookup_order",
            "kind": "webhook",
            "url": "https://example.com/orders",
            "description": "Find an order by number",
            "parameters": {
                "type": "object",
                "properties": {"order": {"type": "string"}},
                "required": ["order"],
            },
        },
    )
    assert tool.status_code == 201, tool.text
    tool_id = tool.json()["id"]
    agent = await _create(api, tools=[tool_id])
    assert agent["tools"] == [tool_id]
    # Another organization cannot reference it.
    foreign = await api.globex.client.post("/v1/agents", json={**AGENT, "tools": [tool_id]})
    assert foreign.status_code == 422
    assert foreign.json()["errors"][0]["field"] == "tools.0"
    duplicate = await api.acme.client.post(
        "/v1/agents", json={**AGENT, "tools": [tool_id, tool_id]}
    )
    assert duplicate.status_code == 422
