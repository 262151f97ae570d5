//! Which partition a key goes to.
//!
//! We use Kafka's default partitioner for keyed messages: `toPositive(murmur2(key)) % partitions`,
//! murmur2 with Kafka's seed `0x9747b28c`, over the key's UTF-8 bytes. So a key lands on the same
//! partition in the in-process bus, in a Java producer, and in our Kafka adapter.
//!
//! Quirk of librdkafka: its default partitioner is `consistent_random` (CRC32), not murmur2. The
//! Kafka adapter must either set `partitioner=murmur2_random` or pass the partition computed here
//! explicitly; otherwise the same key lands elsewhere than in Java clients.

/// Kafka's `Utils.murmur2` (the 32-bit MurmurHash2 variant Kafka uses), as an unsigned value.
/// `murmur2(b) as i32` equals Java's result.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    // Java uses the int length; keys longer than 4 GiB are not a concern.
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    // Java's switch falls through from case 3 to case 1.
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if let Some(first) = rest.first() {
        h ^= u32::from(*first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of `key` among `partitions` (a count of 0 is treated as 1):
/// Kafka's default keyed partitioner, `(murmur2(key) & 0x7fffffff) % partitions`.
///
/// Stable across processes, platforms and releases: changing it would reorder in-flight
/// instances, so it is pinned by tests against Kafka's own vectors.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::{murmur2, partition_for};
    use proptest::prelude::*;

    #[test]
    fn murmur2_matches_kafkas_own_vectors() {
        // Apache Kafka, clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key) as i32,
                expected,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn pinned_partitions_do_not_move() {
        // If this changes, keys of running instances move partitions: never change it silently.
        assert_eq!(
            partition_for("21", 16),
            (-973_932_308_i32 as u32 & 0x7fff_ffff) % 16
        );
        assert_eq!(partition_for("abc", 8), 479_470_107 % 8);
        assert_eq!(partition_for("anything", 0), 0);
        assert_eq!(partition_for("anything", 1), 0);
    }

    proptest! {
        #[test]
        fn partition_for_is_stable_and_in_range(key in ".*", partitions in 1u32..1024) {
            let p = partition_for(&key, partitions);
            prop_assert!(p < partitions);
            prop_assert_eq!(p, partition_for(&key, partitions));
            prop_assert_eq!(p, (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions);
        }
    }
}
