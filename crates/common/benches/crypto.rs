//! Cost of the identity operations on the issuance path: key generation,
//! CSR build, CSR parse + signature check, leaf signing, chain verification.
//! `cargo xtask bench crypto` (or `cargo bench -p meshid-common --bench crypto`).

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use meshid_common::keys::parse_csr_pem;
use meshid_common::{
    CaOptions, CertificateAuthority, KeyType, PrivateKey, SpiffeId, TrustBundle, Usage,
};

fn id() -> SpiffeId {
    SpiffeId::for_service_account("cluster.local", "default", "bench").expect("valid id")
}

fn keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("keygen");
    g.bench_function("ecdsa-p256", |b| {
        b.iter(|| PrivateKey::generate(black_box(KeyType::EcdsaP256)).unwrap())
    });
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("rsa-2048", |b| {
        b.iter(|| PrivateKey::generate(black_box(KeyType::Rsa2048)).unwrap())
    });
    g.finish();
}

fn csr(c: &mut Criterion) {
    let mut g = c.benchmark_group("csr");
    for kt in [KeyType::EcdsaP256, KeyType::Rsa2048] {
        let key = PrivateKey::generate(kt).unwrap();
        let pem = key.csr_for(&id()).unwrap();
        g.bench_function(format!("build/{kt}"), |b| {
            b.iter(|| key.csr_for(black_box(&id())).unwrap())
        });
        g.bench_function(format!("parse+verify/{kt}"), |b| {
            b.iter(|| parse_csr_pem(black_box(&pem)).unwrap())
        });
    }
    g.finish();
}

fn sign(c: &mut Criterion) {
    let mut g = c.benchmark_group("sign-leaf");
    for ca_kt in [KeyType::EcdsaP256, KeyType::Rsa2048] {
        let ca = CertificateAuthority::self_signed_root(&CaOptions {
            key_type: ca_kt,
            ..CaOptions::new("cluster.local", Duration::from_secs(86_400))
        })
        .unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let spki = key.public_key_spki().to_vec();
        g.bench_function(format!("ca-{ca_kt}"), |b| {
            b.iter(|| {
                ca.issue_leaf(
                    black_box(&spki),
                    &id(),
                    Duration::from_secs(86_400),
                    SystemTime::now(),
                )
                .unwrap()
            })
        });
        let leaf = ca
            .issue_leaf(&spki, &id(), Duration::from_secs(86_400), SystemTime::now())
            .unwrap();
        let bundle = TrustBundle::new(vec![ca.cert().clone()]).unwrap();
        g.bench_function(format!("verify-chain/ca-{ca_kt}"), |b| {
            b.iter(|| {
                bundle
                    .verify(
                        black_box(std::slice::from_ref(&leaf)),
                        Usage::ClientAuth,
                        SystemTime::now(),
                    )
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, keys, csr, sign);
criterion_main!(benches);
