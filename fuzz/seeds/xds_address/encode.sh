#!/usr/bin/env bash
# Writes the xds_address seed corpus (fuzz/corpus/xds_address/NAME) from
# the DeltaDiscoveryResponse text protos beside this script.
set -euo pipefail
cd "$(dirname "$0")"
proto=../../../proto
out=../../corpus/xds_address
mkdir -p "$out"
for text in *.txtpb; do
    protoc -I "$proto" --encode=envoy.service.discovery.v3.DeltaDiscoveryResponse \
        envoy/service/discovery/v3/ads.proto istio/workload/workload.proto \
        < "$text" > "$out/${text%.txtpb}"
done
