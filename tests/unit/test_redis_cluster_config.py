"""REDIS_CLUSTER's settings and key naming, without a server (tests/integration/test_redis_cluster.py runs a real
cluster)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster
from redis.cluster import key_slot

from app.deployment import DeploymentBoard
from app.settings import Settings
from app.store import connect, user_key


def test_a_single_server_keeps_todays_key_names_and_a_cluster_hash_tags_the_user() -> None:
    # single server: unchanged, so users stored before an upgrade keep their history
    assert user_key("ctr:hist:", "u1", cluster=False) == "ctr:hist:u1"
    # cluster: the user id is the hash tag, so the slot is the user's whatever the prefix
    assert user_key("ctr:hist:", "u1", cluster=True) == "ctr:hist:{u1}"
    assert key_slot(user_key("a:", "u1", cluster=True).encode()) == key_slot(user_key("b:", "u1", True).encode())


def test_the_deployment_boards_keys_share_a_slot_on_a_cluster_only() -> None:
    async def names() -> tuple[tuple[str, str], tuple[str, str], bool]:
        cluster = DeploymentBoard(connect("redis://127.0.0.1:1", True, 1.0), "ctr:deployment", 1.0)
        single = DeploymentBoard(connect("redis://127.0.0.1:1", False, 1.0), "ctr:deployment", 1.0)
        await cluster.close()
        await single.close()
        both = (cluster.models_key, cluster.revision_key), (single.models_key, single.revision_key)
        return *both, isinstance(cluster.client, RedisCluster)

    on_cluster, on_single, is_cluster_client = asyncio.run(names())
    assert is_cluster_client and on_cluster == ("{ctr:deployment}:models", "{ctr:deployment}:revision")
    assert key_slot(on_cluster[0].encode()) == key_slot(on_cluster[1].encode())
    assert on_single == ("ctr:deployment:models", "ctr:deployment:revision")


def test_redis_cluster_needs_a_seed_node() -> None:
    with pytest.raises(ValidationError, match="REDIS_CLUSTER=true needs REDIS_URL"):
        Settings(redis_cluster=True)
    assert Settings(redis_cluster=True, redis_url="redis://10.0.0.1:6379").redis_cluster
    assert not Settings().redis_cluster  # single-node Redis (or none) stays the default
