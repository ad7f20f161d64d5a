//! Links the functions the release agent runs together (link-order.txt; why
//! and how: the meshid-link-order crate).

fn main() {
    meshid_link_order::link();
}
