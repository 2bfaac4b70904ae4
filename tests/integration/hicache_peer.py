"""A second "SGLang instance" for the HiCache shared-tier test, in its own process (its own Mooncake
client): builds kvconnect's HiCache storage through SGLang's factory over a host pool with other
contents, looks the given page hashes up, loads them into its own pages and prints, as JSON, what
it found and the SHA-256 of every page it loaded.

    python -m tests.integration.hicache_peer '{"extra": {...}, "keys": [...], "pages": [...]}'
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch


def main(argv: list[str]) -> int:
    from tests.sglang_stubs import import_sglang

    mods = import_sglang()
    from tests.sglang_stubs.host_pool import make_host_pool, page_bytes

    req = json.loads(argv[0])
    hs = mods["sglang.srt.mem_cache.hicache_storage"]
    factory = mods["sglang.srt.mem_cache.storage.backend_factory"].StorageBackendFactory
    sc = hs.HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=True, model_name="tiny", extra_config=req["extra"],
    )
    pool = make_host_pool(seed=1)
    st = factory.create_backend("dynamic", sc, pool)
    st.register_mem_pool_host(pool)
    ps = pool.page_size
    idx = torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in req["pages"]]).to(torch.int64)
    out = {"exists": st.batch_exists(req["keys"]), "got": st.batch_get_v1(req["keys"], idx)}
    out["sha"] = [hashlib.sha256(page_bytes(pool, p)).hexdigest() for p in req["pages"]]
    out["stats"] = st.stats
    st.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
