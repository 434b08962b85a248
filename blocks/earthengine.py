"""Earth Engine credentials as a Prefect block (the key is stored as a secret).

    from blocks import EarthEngineCredentials
    EarthEngineCredentials(project="my-ee-project",
                           service_account_key=json.load(open("key.json"))).save("ee", overwrite=True)

then run the flow with ``--set source=earthengine --set source_options='{"credentials_block": "ee"}'``.
Without a key the block means "the persistent credentials of `earthengine
authenticate` on the machine that runs the flow", plus the project.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class EarthEngineCredentials(Block):
    """Earth Engine Cloud project and, optionally, a service-account key (secret)."""

    _block_type_name = "Earth Engine Credentials"
    _description = "Cloud project and service-account key for Google Earth Engine (key stored as a secret)."

    project: str = Field(..., description="Cloud project registered for Earth Engine")
    service_account_key: SecretStr | None = Field(
        None, description="the service account's JSON key (whole file); empty: use `earthengine authenticate` credentials")
    max_concurrent_requests: int = Field(40, ge=1, description="the project's Earth Engine concurrent-request ceiling")

    def key_info(self) -> dict[str, Any] | None:
        import json

        if self.service_account_key is None:
            return None
        raw = self.service_account_key.get_secret_value()
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"block {self._block_document_name or ''!r}: service_account_key is not JSON "
                             f"(line {exc.lineno}); paste the whole key file") from None
