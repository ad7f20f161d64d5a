fn main() {
    let t = std::time::Instant::now();
    let mut b = [0u8; 16];
    aws_lc_rs_fill(&mut b);
    println!("first rand fill: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let k = meshid_common::PrivateKey::generate(meshid_common::KeyType::EcdsaP256).unwrap();
    println!("first keygen: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let _k2 = meshid_common::PrivateKey::generate(meshid_common::KeyType::EcdsaP256).unwrap();
    println!("second keygen: {:?}", t.elapsed());
    let id = meshid_common::SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
    let t = std::time::Instant::now();
    let _ = k.csr_for(&id).unwrap();
    println!("csr: {:?}", t.elapsed());
}
fn aws_lc_rs_fill(b: &mut [u8]) {
    let _ = meshid_common::keys::PrivateKey::generate;
    let _ = b;
}
