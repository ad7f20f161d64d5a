"""Calls the agent with grpcio's default channel, without generated stubs.

argv: socket path, RPC kind (unary_stream | stream_stream), method path,
request bytes as hex, then `key=value` metadata pairs. Prints the first
response message as hex on stdout, or `ERROR <code> <details>` and exits 2.
"""
import sys
import threading

try:
    import grpc
except ImportError as e:  # the Rust test turns this into a failure
    print(f"MISSING grpcio: {e}", flush=True)
    sys.exit(3)


def main():
    path, kind, method, req_hex = sys.argv[1:5]
    metadata = [tuple(kv.split("=", 1)) for kv in sys.argv[5:]]
    request = bytes.fromhex(req_hex)
    # The default channel: grpcio picks the :authority itself.
    channel = grpc.insecure_channel(f"unix://{path}")
    done = threading.Event()
    try:
        if kind == "unary_stream":
            call = channel.unary_stream(method)(request, metadata=metadata, timeout=10)
        else:
            def requests():
                yield request
                done.wait(10)

            call = channel.stream_stream(method)(requests(), metadata=metadata, timeout=10)
        first = next(call)
        done.set()
        print(first.hex(), flush=True)
        call.cancel()
    except grpc.RpcError as e:
        done.set()
        print(f"ERROR {e.code()} {e.details()}", flush=True)
        sys.exit(2)
    finally:
        channel.close()


main()
