#!/usr/bin/env python3
"""Place N gym-serve replicas with Ray, one per node, and hand their URLs out.

Ray does the placement (a STRICT_SPREAD placement group: one bundle per node);
each bundle holds an actor that starts `gym-serve` on its node, bound to that
node's IP, and reports the URL it bound. The driver waits until every replica
answers `/health`, prints the URLs (one per line, after `replica N:`), writes a
NeMo Gym config snippet with the `base_url` list (`--gym-config`), then keeps
the replicas up until it gets SIGINT or SIGTERM. Routing is Gym's (a session
goes to `sha256(session_id) % N`, see gym_affinity.py) or a router's; weight
pushes go to every URL (`gym-serve push-weights --url A --url B ...`).

    # on a Ray cluster whose nodes all have the binary and the checkpoint at these paths
    python examples/replicas/ray_replicas.py --address auto --replicas 4 \\
        --binary /opt/gym-serve --model /shared/ckpt --port 8000 --gym-config gym_replicas.yaml \\
        -- --admin-api-key "$KEY" --served-model-name policy

    # one machine, for a try or a test: a local Ray instance, replicas bound to 127.0.0.1
    python examples/replicas/ray_replicas.py --address local --placement SPREAD --host 127.0.0.1 --port 0 \\
        --replicas 2 --binary target/debug/gym-serve --model models/out/tiny

(Ray itself binds the node's routable address even when told 127.0.0.1:
it resolves loopback to that address on purpose; `--host` is what keeps
the replicas on loopback.)

Arguments after `--` go to every `gym-serve` (a non-loopback bind needs
`--admin-api-key` or `--api-key`: gym-serve refuses to open its weight
endpoints to the network without one).
"""
import argparse
import os
import signal
import sys
import threading

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import wait_healthy  # noqa: E402


def node_address():
    """The address Ray knows this node by (`ray start --node-ip-address`),
    which on a multi-homed node need not be the default route's address that
    ray.util.get_node_ip_address() gives."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


@ray.remote
class GymServeReplica:
    """Owns one gym-serve process on the node Ray placed it on."""

    def __init__(self, binary, model, host, port, args, launch_dir):
        sys.path.insert(0, launch_dir)  # the actor runs in a fresh worker process
        from launch import Replica

        host = host or node_address()
        self.replica = Replica(binary, model, host=host, port=port, args=args)

    def url(self):
        return self.replica.url

    def stop(self):
        return self.replica.stop()


def gym_config(urls, model_name):
    lines = ["policy_model:", "  responses_api_models:", "    vllm_model:", "      entrypoint: app.py",
             "      base_url:"]
    lines += [f"        - {u}/v1" for u in urls]
    lines += ["      api_key: unused", f"      model: {model_name}", "      return_token_id_information: true"]
    return "\n".join(lines) + "\n"


def served_model_name(serve_args):
    """The `--served-model-name` given to gym-serve, if any (gym-serve's default is the directory name)."""
    for i, arg in enumerate(serve_args):
        if arg == "--served-model-name" and i + 1 < len(serve_args):
            return serve_args[i + 1]
        if arg.startswith("--served-model-name="):
            return arg.split("=", 1)[1]
    return None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="auto", help="Ray cluster address, 'auto', or 'local' (start one here)")
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--binary", required=True, help="gym-serve, at the same path on every node")
    parser.add_argument("--model", required=True, help="checkpoint directory, at the same path on every node")
    parser.add_argument("--host", default=None, help="bind address for gym-serve (default: the node's IP)")
    parser.add_argument("--port", type=int, default=8000, help="gym-serve port on each node (0: any free port)")
    parser.add_argument("--cpus", type=float, default=1, help="CPUs Ray reserves per replica")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs Ray reserves per replica")
    parser.add_argument("--placement", default="STRICT_SPREAD", choices=["STRICT_SPREAD", "SPREAD", "PACK"],
                        help="STRICT_SPREAD: one replica per node (fails with fewer nodes than replicas)")
    parser.add_argument("--gym-config", default=None, help="write a NeMo Gym vllm_model snippet with the URLs here")
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then arguments for every gym-serve")
    args = parser.parse_args(argv)
    if args.serve_args[:1] == ["--"]:
        args.serve_args = args.serve_args[1:]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.address == "local":
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=args.address)
    bundle = {"CPU": args.cpus, **({"GPU": args.gpus} if args.gpus else {})}
    group = placement_group([bundle] * args.replicas, strategy=args.placement)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    actors = []
    try:
        ray.get(group.ready(), timeout=args.ready_timeout)
        launch_dir = os.path.dirname(os.path.abspath(__file__))
        for i in range(args.replicas):
            strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i)
            actors.append(GymServeReplica.options(num_cpus=args.cpus, num_gpus=args.gpus,
                                                  scheduling_strategy=strategy)
                          .remote(args.binary, args.model, args.host, args.port, args.serve_args, launch_dir))
        urls = ray.get([a.url.remote() for a in actors], timeout=args.ready_timeout)
        wait_healthy(urls, timeout=args.ready_timeout)
        for i, url in enumerate(urls):
            print(f"replica {i}: {url}", flush=True)
        if args.gym_config:
            name = served_model_name(args.serve_args) or os.path.basename(os.path.normpath(args.model))
            with open(args.gym_config, "w") as f:
                f.write(gym_config(urls, name))
        print("replicas ready", flush=True)
        stopped.wait()
    finally:
        for actor in actors:
            try:
                ray.get(actor.stop.remote(), timeout=60)
            except Exception:  # a replica that failed to start, or is gone
                ray.kill(actor)
        remove_placement_group(group)
        ray.shutdown()


if __name__ == "__main__":
    main()
