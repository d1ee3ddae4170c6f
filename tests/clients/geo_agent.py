"""A third-party agent kind `geo`, written against the contract only, in Python with nats-py.

It logs in with the seed file `policyctl auth add-agent geo` wrote (the bare seed, read by
nats-py's `nkeys_seed`), sets its role's inbox prefix, serves `policy.agent.geo.>` in queue
group `geo`, answers the services ping, and answers every request with the state patch
`{zone: eu}`. Usage: geo_agent.py NATS_URL SEED_FILE; prints `ready` once subscribed.
"""

import asyncio
import base64
import json
import sys

import nats

# {"zone": "eu"} in MessagePack: a map of one entry, two short strings.
PATCH = base64.b64encode(b"\x81\xa4zone\xa2eu").decode()


async def main(url: str, seed: str) -> None:
    nc = await nats.connect(url, nkeys_seed=seed, inbox_prefix=b"_INBOX.policy.agent-geo")

    async def decide(msg):
        if msg.reply:
            await nc.publish(msg.reply, b"", headers={"Policy-State": PATCH})

    async def ping(msg):
        pong = {"type": "io.nats.micro.v1.ping_response", "name": "policy-agent-geo",
                "id": "py-1", "version": "0.0.1", "metadata": {}}
        if msg.reply:
            await nc.publish(msg.reply, json.dumps(pong).encode())

    await nc.subscribe("policy.agent.geo.>", queue="geo", cb=decide)
    await nc.subscribe("$SRV.PING.policy-agent-geo", cb=ping)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
