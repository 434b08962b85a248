"""Earth Engine credentials as a Prefect block (the key is stored as a secret).

    from blocks import EarthEngineCredentials
    EarthEngineCredentials(project="my-ee-project",
                           service_account_key=json.load(open("key.json"))).save("ee", overwrite=True)

then run the flow with ``--set source=earthengine --set source_options='{"credentials_block": "ee"}'``.
Without a key the block means "the persistent credentials of `earthengine
authenticate` on the machine that runs the flow", plus the project.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from tasks.common.prefect_server import local_prefect_server


class EarthEngineCredentials(Block):
    """Earth Engine Cloud project and, optionally, a service-account key (secret)."""

    _block_type_name = "Earth Engine Credentials"
    _description = "Cloud project and service-account key for Google Earth Engine (key stored as a secret)."

    project: str = Field(..., description="Cloud project registered for Earth Engine")
    service_account_key: SecretStr | None = Field(
        None, description="the service account's JSON key (whole file); empty: use `earthengine authenticate` credentials")

    def key_info(self) -> dict[str, Any] | None:
        if self.service_account_key is None:
            return None
        raw = self.service_account_key.get_secret_value()
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"block {self._block_document_name or ''!r}: service_account_key is not JSON "
                             f"(line {exc.lineno}); paste the whole key file") from None


def main(argv: list[str] | None = None) -> int:
    """Save an EarthEngineCredentials block on the Prefect server the flows use
    (``PREFECT_API_URL``, else the project's local server in ``.prefect/``)::

        python -m blocks.earthengine --name ee --project my-project --key service-account.json
        python -m blocks.earthengine --name ee --project my-project    # persistent credentials
    """
    ap = argparse.ArgumentParser(prog="python -m blocks.earthengine", description=main.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="block name, used as source_options.credentials_block")
    ap.add_argument("--project", required=True, help="Cloud project registered for Earth Engine")
    ap.add_argument("--key", type=Path, help="service-account JSON key file (omit: `earthengine authenticate` credentials)")
    args = ap.parse_args(argv)
    key = args.key.read_text() if args.key else None
    with local_prefect_server():
        block = EarthEngineCredentials(project=args.project, service_account_key=key)
        block.key_info()  # validates the JSON before saving
        block.save(args.name, overwrite=True)
    print(f"saved EarthEngineCredentials block {args.name!r} (project {args.project}, "
          f"{'service-account key' if key else 'persistent credentials'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
