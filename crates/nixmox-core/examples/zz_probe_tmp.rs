fn main() {
    let text =
        std::fs::read_to_string("examples/homelab/services/guacamole/manifest.yaml").unwrap();
    for cut in 0..text.len() {
        if !text.is_char_boundary(cut) {
            continue;
        }
        let t = &text[..cut];
        let nl = t.matches('\n').count() + 1;
        match nixmox_core::syntax::parse(t, nixmox_core::syntax::Format::Yaml) {
            Err(e) if e.span.line as usize > nl => {
                println!(
                    "cut {cut} lines {nl} span {:?} {:?} tail={:?}",
                    e.span,
                    e.message,
                    &t[t.len().saturating_sub(30)..]
                );
            }
            _ => {}
        }
    }
}
