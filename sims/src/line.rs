//! Event-log lines without `core::fmt`: every event the simulator processes adds one
//! line to the log's digest, and formatting numbers and UUIDs cost more than handling
//! most events. So a line's pieces go into the digest as values (see [`Digest`]), and
//! are written out as text only when the log itself is kept (`--log`); that text is
//! what `Display` would write (tested below).
//!
//! [`Digest`]: crate::report::Digest

use uuid::Uuid;

use crate::report::Digest;

/// A piece of a log line.
pub(crate) trait Part {
    /// Appends the piece as its `Display` form.
    fn put(&self, line: &mut String);
    /// Folds the piece into the digest.
    fn fold(&self, digest: &mut Digest);
}

impl Part for str {
    fn put(&self, line: &mut String) {
        line.push_str(self);
    }
    fn fold(&self, digest: &mut Digest) {
        digest.bytes(self.as_bytes());
    }
}

impl<T: Part + ?Sized> Part for &T {
    fn put(&self, line: &mut String) {
        (**self).put(line)
    }
    fn fold(&self, digest: &mut Digest) {
        (**self).fold(digest)
    }
}

impl Part for bool {
    fn put(&self, line: &mut String) {
        line.push_str(if *self { "true" } else { "false" });
    }
    fn fold(&self, digest: &mut Digest) {
        digest.word(u64::from(*self));
    }
}

impl Part for Uuid {
    fn put(&self, line: &mut String) {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        line.push_str(self.hyphenated().encode_lower(&mut buf));
    }
    fn fold(&self, digest: &mut Digest) {
        let (hi, lo) = self.as_u64_pair();
        digest.word(hi);
        digest.word(lo);
    }
}

macro_rules! integer_part {
    ($($t:ty),*) => {$(
        impl Part for $t {
            fn put(&self, line: &mut String) {
                line.push_str(itoa::Buffer::new().format(*self));
            }
            fn fold(&self, digest: &mut Digest) {
                digest.word(*self as u64);
            }
        }
    )*};
}
integer_part!(u8, u32, u64, usize);

/// Adds a line made of `parts` (each `Display`-equal to its `{}`) to the simulator's
/// event log: `log!(self, "drop ", from, ">", to)` logs what
/// `self.log(format_args!("drop {from}>{to}"))` would write. The pieces are folded
/// into the digest as values; the text is made only if the log is kept.
macro_rules! log {
    ($sim:expr, $($part:expr),+ $(,)?) => {{
        $sim.begin_fold();
        $( $crate::line::Part::fold(&$part, &mut $sim.digest); )+
        $sim.digest.end_line();
        if $sim.config.keep_log {
            let mut line = $sim.begin_line();
            $( $crate::line::Part::put(&$part, &mut line); )+
            $sim.keep_line(line);
        }
    }};
}
pub(crate) use log;

#[cfg(test)]
mod tests {
    use super::Part;
    use proptest::prelude::*;
    use uuid::Uuid;

    proptest! {
        #[test]
        fn parts_write_what_display_writes(a: u64, b: u32, c: u8, d: usize, e: u128, f: bool) {
            let mut line = String::new();
            let u = Uuid::from_u128(e);
            for p in [&a as &dyn Part, &" ", &b, &"/", &c, &d, &u, &f] {
                p.put(&mut line);
            }
            prop_assert_eq!(line, format!("{a} {b}/{c}{d}{u}{f}"));
        }
    }
}
