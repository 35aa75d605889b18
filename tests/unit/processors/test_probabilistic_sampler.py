"""probabilistic_sampler: the hash_seed algorithm against contrib's own test vectors, float32 scaling,
sampling.priority, tracestate, config errors. (The 10 000-id comparison with the real collector is in
tests/e2e/test_real_collector.py.)"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from processors import probabilistic_sampler as ps
from processors.probabilistic_sampler import HashSeedSampler, compute_hash, fnv1a32, scaled_rate
from tests.unit.processors.helpers import make, one, span

# Test vectors copied from contrib processor/probabilisticsamplerprocessor v0.161.0, tracesprocessor_test.go
# (Test_hashingSampler_50pct...): (hash_seed, trace id, sampled at 50 %).
CONTRIB_50PCT = [
    (653, "474a03c76d75951a4b4c537ced8f1122", True), (563, "53a518291e91307e43cd8467bb06f986", True),
    (142, "a56a02f843b9bc6ee0b13889249e90e6", True), (904, "4e40762d3ee97a1c0932e4fa584f89a8", False),
    (445, "5224507db93db513f0ea2a4b4e0578c8", True), (38, "0c8717ced36216037af657e9d7f8b35b", True),
    (561, "2a8aa76c18d08e1e8be935541f9318c7", False), (757, "9e3d0f9481dc422cb613ea550897ae71", False),
    (22, "66a66c516ac22054673e5da5e6492545", False), (172, "84a1ce7bcea3e66194e72b4aa2694e31", True),
    (552, "a811a7def34ca4b98d8e320afd115fad", False), (546, "e3a345cc8dbb6f014bfa1edad3981820", True),
    (315, "a71effb50e28d27cbdc9892f3765b8c2", False), (510, "55ee665a3fa22f8ea1b744ce15a7339d", False),
    (230, "7a5006be4d0ce7b542d59f83cd6f1c41", False), (544, "825b8fb9cfd45867794f4cd8a5a699bd", False),
    (790, "7629ecbea89398bfd9752a2f51c2c137", True), (555, "de6cdfb44d69e211f886c57120d7bda0", True),
    (147, "a8a5c3bb9205883fae17ead6675b2450", False), (238, "937e6cb3332dbe87062fa3997f48f425", False),
    (122, "5a357e150995e005847816c431ba502d", False), (963, "20cb3dcebe2cf8abe6102f4a2e548245", False),
    (141, "1b0afbd09abaaf7996cd26f8f6533795", False), (666, "3ee60b013303bcfda06be89071b90bd1", True),
    (305, "c90c7cf3471bbc3a804a8a831633705b", True), (270, "18dda74dfca45a7b0261510f385fb4de", True),
    (381, "600cf70c7bb4918e54aefd78c84f3996", True), (35, "855f493c5b5b1e2fcbc9993f8061eac8", False),
    (839, "89bc498feb21d969cf0eabf916aa621a", False), (561, "0a0af00f63e098a39883705a423b0aa8", True),
    (667, "0c38553d71f54dfc37155c22cc8bf243", False), (603, "49493809d1a49ea879e6aba37afde958", True),
    (92, "eb60d98b8f8fe22d8970f44f0e2b6bad", True), (70, "19c386ee7a9f2d56ff9ab2e6374540af", False),
    (567, "2a033c15405f1c7a311f653719ed47b7", False), (936, "62dda24e4be24f5198e4d8dd4010c811", True),
    (210, "bb134e26ee92e282e29cabdb1d00d333", True), (835, "6c77db08bbded7bdd5c99c6e2fea41d2", False),
    (864, "99f6a7e7b50845b4fb64b7c2ee49f53c", True), (775, "e908cb91224bee8fd4b5f3632f65717f", True),
    (687, "45a5ace7234d92d9983b4f3858bc0b8e", False), (761, "8c8a25d232fd4d3a37a5f70ccb82d752", False),
    (400, "54156d7434a894ef07f2a80dbf0f1138", True), (741, "67e3bfb02b0526dbb79420468d7b83dd", False),
    (871, "f6ea221283dcb42f89bfb15fa33398d2", False), (244, "b663ca45004decf8123a19fb5d7f7115", True),
    (885, "d0e299d54d6dc6469276fd4e48301d73", True), (607, "03240c2748aa67a185909a9345d84aba", False),
    (434, "b00de72ba67e6fe0ed661decac911f7e", True), (889, "20fff68a7cc715b30e4e6d69d53e0f60", False),
    (810, "6bf2bb105e594f6220803da5253551af", False), (494, "54fbb1d3ebe3883b0a01bbf2c9a2bf3e", True),
    (413, "a8a2ecba129d8537e360cf54de9d7460", False), (215, "2df034262b775136f2a313fdcc09738a", True),
    (557, "e3c1b943d9c1199d1108a69aa32a4587", False), (662, "1975d5f5640bac1064d53c2c21e02aae", False),
    (482, "6e4f16727dec3c09539b5f50d35d2c13", False), (223, "63a088446ef0ed60a9cace4698ede026", False),
    (261, "9b662cd6f67a4e3d1f904b4c5d4275b1", True), (112, "a2db788dbadc402b8c466b93b8749a6c", True),
    (6, "d6a68b47c66d1f94eed46b8ddc72faf4", False), (575, "e8a83c42f4515568d0942ec4472c9d2c", True),
    (568, "030e14c2954e3f08134b355f33414ba9", False), (965, "022315846d42a38322d6fd26250444b3", True),
    (512, "b3ba1ed226288dede87ac1f2ba88de2b", True), (108, "c57d0dcf43d5b154ef04c7953c94cd12", True),
    (248, "a835fe521d9cbfcfb724b603f87c7403", False), (46, "eda867e6df95e74abefac336c7f4cd1a", False),
    (879, "09e9e67a261ea3e00d817105b57ffd4e", False), (853, "6a780cf250cb3d2b699394042e6723a8", False),
    (639, "4c99d7f14c66b3123caf57980f8e2a31", False), (111, "79dc8d7a54bc3e8ef513b9cd8d830564", True),
    (135, "9c2e5d9d713e5219b0f9e5b884835e69", False), (209, "3ccb300bf7b983229979e0c46db267b0", True),
    (629, "0bb7b9da64da250c3934bb39130dc990", True), (910, "b25713ca4cea377871eaa334bc2dd382", True),
    (667, "69afc041003851cec60f41db97e005a9", True), (449, "c844b5428abe0cf82eaf02566781870a", True),
    (16, "2533c732bed8c1ba4721c25a1205f06c", False), (936, "ecc770b4be885dfc8d6fa135bc2c93bb", True),
    (595, "63b67cbb42de52e9916241ad94fcd5e8", True), (83, "fc4998bc53ccd42a5b8e7c86a93d4c88", False),
    (878, "59f0677dffe1a0a8c5895cb263e3a019", False), (206, "eb897eff9e7c7363e063b340a0c6b315", True),
    (710, "89e4c7e6af305be6cd139abcae953db5", True), (650, "97563d45ee254231e1ace05fb746bcce", False),
    (233, "3f580864f295ff13f179c3c907032ea9", True), (836, "e9b78e03706265a6936bff2a41530104", False),
    (568, "c458603ee921fa8711085c15b871b245", False), (816, "4bbfffab5b5975c1b007ebc518bf416d", False),
    (397, "61a1a65746287d78a431c6848ed1ffb3", False), (847, "53eee02f4672a72e93369b2c2ecf36eb", False),
    (354, "6ea23c3068a2c304488c8e67a072db97", False), (961, "eed247645e510ded87bd9afcf1d3e237", False),
    (799, "092af4ff2fdea5bb1c708b2169bdfd95", False), (99, "497f02db51c898ac441aae18a8b7ced9", False),
    (773, "988481445600bb91bbe23e3103034bcd", True), (928, "f1813835ac0f456721ef3aac39c0269a", True),
    (235, "1999920085682c007eb3a6984d2a7f05", True), (460, "60c3b9a2dde734d71ba5cca7eb164bce", True),
]


def test_fnv1a32_reference_values():
    # Go hash/fnv reference values.
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968
    assert compute_hash(b"", 0) == fnv1a32(b"\x00\x00\x00\x00")


@pytest.mark.parametrize("seed, tid, sampled", CONTRIB_50PCT)
def test_contrib_vectors_at_50_percent(seed, tid, sampled):
    s = HashSeedSampler(50, seed)
    sp = span(tid=1)
    sp.trace_id = bytes.fromhex(tid)
    assert s.decide(sp)[0] is sampled
    assert s.sampled_by_hash(bytes.fromhex(tid)) is sampled


@pytest.mark.parametrize("pct, scaled", [
    (100, 16384), (50, 8192), (25, 4096), (10, 1638), (1, 163), (0.01, 1), (0.001, 0), (100.0 / 3, 5461),
    (33, 5406), (99.99, 16382), (150, 16384), (0, 0), (12.5, 2048), (0.1, 16),
])
def test_float32_scaling(pct, scaled):
    assert scaled_rate(pct) == scaled


@pytest.mark.parametrize("pct, tvalue", [(100, "0"), (75, "4"), (50, "8"), (25, "c"), (10, "e668"),
                                         (100.0 / 3, "aaac")])
def test_tracestate_threshold_matches_contrib(pct, tvalue):
    s = HashSeedSampler(pct, 4312)
    found = 0
    for i in range(1, 2000):
        sp = span(tid=i * 7919)
        if s.decide(sp)[0]:
            ot = dict(kv.split(":") for kv in sp.trace_state.removeprefix("ot=").split(";"))
            assert ot["th"] == tvalue and len(ot["rv"]) == 14
            assert int(ot["rv"], 16) >= (int(ot["th"].ljust(14, "0"), 16) if ot["th"] != "0" else 0)
            found += 1
        else:
            assert sp.trace_state == ""
        if found >= 10:
            break
    assert found >= 10


def test_tracestate_keeps_other_vendors():
    s = HashSeedSampler(100, 1)
    sp = span(trace_state="vendor=x,ot=p:8")
    assert s.decide(sp)[0]
    assert sp.trace_state.startswith("ot=rv:") and sp.trace_state.endswith(";th:0;p:8,vendor=x")


@pytest.mark.parametrize("attrs, pct, sampled", [
    ({"sampling.priority": 1}, 0, True), ({"sampling.priority": 0}, 100, False),
    ({"sampling.priority": 2.5}, 0, True), ({"sampling.priority": 0.0}, 100, False),
    ({"sampling.priority": "5"}, 0, True), ({"sampling.priority": "0"}, 100, False),
    ({"sampling.priority": "high"}, 100, True), ({"sampling.priority": -1}, 100, True),
    ({"sampling.priority": True}, 0, False),
])
def test_sampling_priority(attrs, pct, sampled):
    s = HashSeedSampler(pct, 0)
    assert s.decide(span(attrs=attrs))[0] is sampled


def test_fail_closed_and_existing_randomness():
    assert HashSeedSampler(100, 0).decide(span(tid=0))[0] is False  # no trace id: no randomness
    assert HashSeedSampler(100, 0, fail_closed=False).decide(span(tid=0))[0] is True
    sp = span(trace_state="ot=rv:00000000000000")
    assert HashSeedSampler(100, 0).decide(sp)[0] is False and sp.trace_state == "ot=rv:00000000000000"


def test_processor_drops_and_counts():
    p, sink, t = make(ps, {"sampling_percentage": 50, "hash_seed": 22}, "probabilistic_sampler")
    for i in range(1, 1001):
        p.consume(one(span(tid=i * 104729)))
    kept = len(sink.spans())
    assert 400 < kept < 600
    reg = t.metrics.registry
    labels = {"processor": "probabilistic_sampler", "policy": "trace_id_hash"}
    assert reg.get_sample_value("otelcol_processor_probabilistic_sampler_count_traces_sampled_total",
                                {**labels, "sampled": "true"}) == kept
    assert reg.get_sample_value("otelcol_processor_probabilistic_sampler_count_traces_sampled_total",
                                {**labels, "sampled": "false"}) == 1000 - kept


@pytest.mark.parametrize("cfg, message", [
    ({"sampling_percentage": -1}, "sampling rate is negative: -1.000000%"),
    ({"sampling_percentage": float("nan")}, "sampling rate is invalid"),
    ({"sampling_percentage": 1e-20}, "sampling rate is too small"),
    ({"sampling_percentage": 5, "hash_seed": -1}, "hash_seed must be an unsigned 32-bit integer"),
    ({"sampling_percentage": 5, "sampling_precision": 15}, "sampling precision is too great"),
    ({"sampling_percentage": 5, "mode": "proportional"}, 'mode "proportional" is not supported'),
])
def test_config_errors(cfg, message):
    with pytest.raises(ValidationError) as ei:
        ps.Config.model_validate(cfg)
    assert message in str(ei.value)
