//! Arbitrary bytes, as (lossy) UTF-8 TOML, through the config parser and
//! validator: every input must give a `Config` or a `ConfigErrors`, never a
//! panic. The errors are rendered too (they quote fields, lines and spans).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rungen_gateway::config::Config;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::from_toml(Path::new("fuzz.toml"), &text) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(errors) => {
            let _ = errors.to_string();
        }
    }
});
