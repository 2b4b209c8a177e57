//! The control-protocol decoder: any bytes a client sends give requests, an error or "need
//! more", never a panic and never an allocation past the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uet::api::protocol::{MAX_FRAME, Request, decode_frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        match decode_frame::<Request>(rest) {
            Ok(Some((request, used))) => {
                assert!(used >= 4 && used <= rest.len() && used <= MAX_FRAME + 4);
                // what decodes encodes back to the same request
                let again = serde_json::to_vec(&request).unwrap();
                let mut frame = (again.len() as u32).to_be_bytes().to_vec();
                frame.extend(again);
                let (back, _) = decode_frame::<Request>(&frame).unwrap().unwrap();
                assert_eq!(back, request);
                rest = &rest[used..];
            }
            Ok(None) | Err(_) => break,
        }
    }
});
