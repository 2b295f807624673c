"""The API over the S3 store (ADAPTERSERVE_STORE=s3://...): uploads land in the bucket, two apps share it."""

from __future__ import annotations

import asyncio
import time

import pytest
from api_support import Reference, admin, assert_outputs_close, make_artifact, multipart, tiny_backbone, until
from store_backends import MotoS3, contents, moto_s3  # noqa: F401  (moto_s3 is a fixture)

from service.settings import Settings
from store.s3 import S3Store

pytestmark = pytest.mark.asyncio

TEXTS = ["the movie was good", "bad plot and boring ending"]


@pytest.fixture
def s3_env(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    """The AWS environment pointing at the test server; returns a fresh store URL."""
    for var, value in {
        "AWS_ENDPOINT_URL": moto_s3.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(var, value)
    return f"s3://{moto_s3.new_bucket()}/adapters"


async def test_upload_to_one_app_is_served_by_another_on_the_same_bucket(running, artifacts, s3_env):
    poll = 0.2
    async with (
        running(store=s3_env, store_poll_s=poll) as (app, client),
        running(store=s3_env, store_poll_s=poll) as (other, other_client),
    ):
        assert isinstance(app.state.service.store, S3Store)
        spec = app.state.service.backbone.spec
        d1, d2 = (make_artifact(artifacts, f"sst2-{i}", "ia3", spec, seed=4 + i) for i in (1, 2))
        r = await client.post("/v1/adapters/sst2", files=multipart(d1), headers=admin())
        assert r.status_code == 201, r.text
        assert any(key.startswith("adapters/tasks/sst2/v1") for key in contents(app.state.service.store))
        ref = Reference(tiny_backbone)
        # The other app never saw the upload; it finds it in the bucket at its next poll.
        started = time.monotonic()
        registry = other.state.service.registry
        await until(
            lambda: registry.is_registered("sst2") and registry.state("sst2").current == 1,
            timeout=30,
        )
        r = await other_client.post("/v1/tasks/sst2/predict", json={"inputs": TEXTS})
        assert r.status_code == 200 and r.headers["X-Adapter-Version"] == "1", r.text
        assert_outputs_close(r.json()["outputs"], ref.outputs(d1, TEXTS))
        # A new version made current on one app is what the other serves next, whole.
        r = await client.post("/v1/adapters/sst2", files=multipart(d2), headers=admin())
        assert r.status_code == 201 and r.json()["version"] == 2, r.text

        async def served() -> str:
            r = await other_client.post("/v1/tasks/sst2/predict", json={"inputs": TEXTS})
            assert r.status_code == 200, r.text
            want = ref.outputs(d1 if r.headers["X-Adapter-Version"] == "1" else d2, TEXTS)
            assert_outputs_close(r.json()["outputs"], want)  # never a mix of the two versions
            return r.headers["X-Adapter-Version"]

        started = time.monotonic()
        while await served() != "2":
            assert time.monotonic() - started < 30, "the new version was never served"
            await asyncio.sleep(poll / 4)
        # Version 2 again, from the other app: the bucket already holds it (409, nothing changed).
        r = await other_client.post(
            "/v1/adapters/sst2", files=multipart(d1), headers=admin(), params={"version": 2}
        )
        assert r.status_code == 409 and r.json()["error"]["type"] == "version_conflict", r.text
        # Deleted through one app, gone from the other at its next poll.
        assert (await client.delete("/v1/adapters/sst2", headers=admin())).status_code in (200, 204)
        await until(lambda: not registry.is_registered("sst2"), timeout=30)
        r = await other_client.post("/v1/tasks/sst2/predict", json={"inputs": TEXTS})
        assert r.status_code == 404, r.text


async def test_settings_keep_an_s3_url_and_refuse_a_bad_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERSERVE_STORE", "s3://my-bucket/adapters/prod")
    settings = Settings()
    assert settings.store == "s3://my-bucket/adapters/prod"
    assert settings.key_file.name.startswith("s3-my-bucket-") and settings.key_file.is_absolute()
    assert settings.poll_interval_s == 2.0
    assert Settings(store="/srv/store").poll_interval_s == 0.0
    assert Settings(store="/srv/store", store_poll_s=1.5).poll_interval_s == 1.5
    with pytest.raises(ValueError, match="bucket"):
        Settings(store="s3://My_Bucket/x")
