//! Event-log lines built without `core::fmt`: every event the simulator processes
//! appends one line to the log's digest, and formatting numbers and UUIDs through the
//! `Display` machinery cost more than handling most events. The bytes are the same as
//! `Display` would write (tested below), so digests do not depend on which is used.

use uuid::Uuid;

/// A piece of a log line.
pub(crate) trait Part {
    /// Appends the piece as its `Display` form.
    fn put(&self, line: &mut String);
}

impl Part for str {
    fn put(&self, line: &mut String) {
        line.push_str(self);
    }
}

impl<T: Part + ?Sized> Part for &T {
    fn put(&self, line: &mut String) {
        (**self).put(line)
    }
}

impl Part for bool {
    fn put(&self, line: &mut String) {
        line.push_str(if *self { "true" } else { "false" });
    }
}

impl Part for Uuid {
    fn put(&self, line: &mut String) {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        line.push_str(self.hyphenated().encode_lower(&mut buf));
    }
}

macro_rules! integer_part {
    ($($t:ty),*) => {$(
        impl Part for $t {
            fn put(&self, line: &mut String) {
                line.push_str(itoa::Buffer::new().format(*self));
            }
        }
    )*};
}
integer_part!(u8, u32, u64, usize);

/// Appends a line made of `parts` (each `Display`-equal to its `{}`) to the simulator's
/// event log: `log!(self, "drop ", from, ">", to)` writes what
/// `self.log(format_args!("drop {from}>{to}"))` would.
macro_rules! log {
    ($sim:expr, $($part:expr),+ $(,)?) => {{
        let mut line = $sim.begin_line();
        $( $crate::line::Part::put(&$part, &mut line); )+
        $sim.end_line(line);
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
