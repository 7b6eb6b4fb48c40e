//! Lanes: the fixed set of priority classes a connection carries, and how a frame's
//! Stream Prio and URGENT flag pick one.

use super::header::{Flags, Header};

/// A priority class, carried on its own long-lived QUIC stream per connection.
/// Order is kept within a lane; none is promised across lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// Bulk data: Stream Prio 0..=63.
    Bulk = 0,
    /// Ordinary traffic (results, SYNC, actor messages): 64..=127.
    Normal = 1,
    /// Coordination (ALLOCATE, discovery, membership): 128..=191.
    Coordination = 2,
    /// Urgent control (ADJUST, CONTROL): 192..=255, or any frame flagged URGENT.
    Urgent = 3,
}

impl Lane {
    /// Every lane, lowest priority first.
    pub const ALL: [Lane; 4] = [Lane::Bulk, Lane::Normal, Lane::Coordination, Lane::Urgent];

    /// The lane for a Stream Prio value.
    pub fn for_prio(prio: u8) -> Lane {
        match prio {
            0..=63 => Lane::Bulk,
            64..=127 => Lane::Normal,
            128..=191 => Lane::Coordination,
            192..=255 => Lane::Urgent,
        }
    }

    /// The lane a frame travels on: URGENT wins, otherwise its Stream Prio decides.
    pub fn for_header(header: &Header) -> Lane {
        if header.flags.contains(Flags::URGENT) {
            Lane::Urgent
        } else {
            Lane::for_prio(header.prio)
        }
    }

    /// Index into per-lane arrays (0 = bulk).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Bulk => "bulk",
            Lane::Normal => "normal",
            Lane::Coordination => "coordination",
            Lane::Urgent => "urgent",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MessageType;

    #[test]
    fn prio_ranges_and_urgent_flag_pick_lanes() {
        assert_eq!(Lane::for_prio(0), Lane::Bulk);
        assert_eq!(Lane::for_prio(63), Lane::Bulk);
        assert_eq!(Lane::for_prio(64), Lane::Normal);
        assert_eq!(Lane::for_prio(191), Lane::Coordination);
        assert_eq!(Lane::for_prio(192), Lane::Urgent);
        let mut h = Header::new(MessageType::Envelope);
        h.prio = 0;
        h.flags = Flags::URGENT;
        assert_eq!(Lane::for_header(&h), Lane::Urgent);
        assert_eq!(
            Lane::for_prio(MessageType::Adjust.default_prio()),
            Lane::Urgent
        );
        assert_eq!(
            Lane::for_prio(MessageType::Allocate.default_prio()),
            Lane::Coordination
        );
    }
}
