//! The routing table: which service answers which host hypercalls, and
//! which services observe or handle which trap classes.
//!
//! The table is built from the image manifest's service records. The same
//! checks run twice: when the image is built (so a bad manifest is a build
//! error with a message) and when the core boots (so a hand-made package
//! cannot slip past them).

use moat_abi::hypercall::{self, SERVICE_RANGE_END, SERVICE_RANGE_START};
use moat_abi::trap::TrapClass;

/// Most services the table routes to.
pub const MAX_ROUTED: usize = 8;

/// What one service asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteSpec {
    /// First Moat function number (`0xC600_0000 | n`); ignored if `count` is 0.
    pub first: u16,
    pub count: u16,
    /// Bit per [`TrapClass`]: told about these traps.
    pub observes: u32,
    /// Bit per [`TrapClass`]: decides these traps.
    pub handles: u32,
}

/// Why a set of routes was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingError {
    /// Service `service`'s range leaves the routable space.
    OutOfRange { service: usize },
    /// Two services' hypercall ranges overlap.
    Overlap { first: usize, second: usize },
    /// Two services both handle this class.
    TwoHandlers {
        class: TrapClass,
        first: usize,
        second: usize,
    },
    /// A mask names a class that does not exist.
    UnknownClass { service: usize },
    /// More services than the table holds.
    TooMany,
}

impl core::fmt::Display for RoutingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfRange { service } => write!(
                f,
                "service {service}: hypercall range must lie within {SERVICE_RANGE_START:#x}..{SERVICE_RANGE_END:#x}"
            ),
            Self::Overlap { first, second } => {
                write!(
                    f,
                    "services {first} and {second} have overlapping hypercall ranges"
                )
            }
            Self::TwoHandlers {
                class,
                first,
                second,
            } => {
                write!(
                    f,
                    "services {first} and {second} both handle {} traps",
                    class.name()
                )
            }
            Self::UnknownClass { service } => {
                write!(f, "service {service}: unknown trap class bit")
            }
            Self::TooMany => write!(f, "more than {MAX_ROUTED} services"),
        }
    }
}

/// The checked table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingTable {
    specs: heapless::Vec<RouteSpec, MAX_ROUTED>,
    handlers: [Option<u8>; TrapClass::COUNT],
    observed: u32,
}

const CLASS_MASK: u32 = (1 << TrapClass::COUNT) - 1;

impl RoutingTable {
    /// Checks `specs` (service `i` is `specs[i]`) and builds the table.
    pub fn build(specs: &[RouteSpec]) -> Result<Self, RoutingError> {
        let mut table = RoutingTable::default();
        for (i, s) in specs.iter().enumerate() {
            if s.count != 0 {
                let end = u32::from(s.first) + u32::from(s.count);
                if s.first < SERVICE_RANGE_START || end > u32::from(SERVICE_RANGE_END) {
                    return Err(RoutingError::OutOfRange { service: i });
                }
                for (j, t) in specs[..i].iter().enumerate() {
                    let t_end = u32::from(t.first) + u32::from(t.count);
                    if t.count != 0 && u32::from(s.first) < t_end && u32::from(t.first) < end {
                        return Err(RoutingError::Overlap {
                            first: j,
                            second: i,
                        });
                    }
                }
            }
            if (s.observes | s.handles) & !CLASS_MASK != 0 {
                return Err(RoutingError::UnknownClass { service: i });
            }
            for class in TrapClass::ALL {
                if s.handles & class.bit() != 0 {
                    let slot = &mut table.handlers[class as usize];
                    if let Some(first) = *slot {
                        return Err(RoutingError::TwoHandlers {
                            class,
                            first: usize::from(first),
                            second: i,
                        });
                    }
                    *slot = Some(i as u8);
                }
            }
            table.observed |= s.observes;
            table.specs.push(*s).map_err(|_| RoutingError::TooMany)?;
        }
        Ok(table)
    }

    /// The service and operation a host function id is routed to.
    #[inline]
    pub fn hypercall(&self, function: u32) -> Option<(usize, u16)> {
        if function & 0xffff_0000 != hypercall::id(0) {
            return None;
        }
        let n = (function & 0xffff) as u16;
        // `build` keeps every routed range inside the service range, so the
        // core's own calls (VCPU_RUN, VM_DONATE, ...) need not scan the
        // specs: the same answer, without eight comparisons on their path.
        if !(SERVICE_RANGE_START..SERVICE_RANGE_END).contains(&n) {
            return None;
        }
        // One unsigned compare per spec: `build` keeps `first + count` within
        // the u16 service range, so a function below `first` wraps to an
        // offset no count reaches, and a count of 0 routes nothing.
        for (i, s) in self.specs.iter().enumerate() {
            let offset = n.wrapping_sub(s.first);
            if offset < s.count {
                // Operation numbers start at 1; function `first` is operation 1.
                return Some((i, offset + 1));
            }
        }
        None
    }

    /// Whether any service observes `class` (the cheap check on every trap).
    pub fn is_observed(&self, class: TrapClass) -> bool {
        self.observed & class.bit() != 0
    }

    /// The services that observe `class`.
    pub fn observers(&self, class: TrapClass) -> impl Iterator<Item = usize> + '_ {
        self.specs
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.observes & class.bit() != 0)
            .map(|(i, _)| i)
    }

    /// The service that decides `class`, if any.
    pub fn handler(&self, class: TrapClass) -> Option<usize> {
        self.handlers[class as usize].map(usize::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(first: u16, count: u16) -> RouteSpec {
        RouteSpec {
            first,
            count,
            ..Default::default()
        }
    }

    #[test]
    fn lookup() {
        let t = RoutingTable::build(&[spec(0x1000, 16), spec(0x1010, 2), spec(0, 0)]).unwrap();
        assert_eq!(t.hypercall(0xc600_1000), Some((0, 1)));
        assert_eq!(t.hypercall(0xc600_100f), Some((0, 16)));
        assert_eq!(t.hypercall(0xc600_1010), Some((1, 1)));
        assert_eq!(t.hypercall(0xc600_1012), None);
        assert_eq!(t.hypercall(0xc600_0000), None);
        // Not a fast SMC64 vendor-hyp id.
        assert_eq!(t.hypercall(0x8600_1000), None);
        assert_eq!(t.hypercall(0xc700_1000), None);
    }

    #[test]
    fn a_function_below_a_range_does_not_wrap_into_it() {
        // The largest range the table accepts, and one starting just above
        // a function: neither is reached from below.
        let t = RoutingTable::build(&[
            spec(
                SERVICE_RANGE_START + 1,
                SERVICE_RANGE_END - SERVICE_RANGE_START - 1,
            ),
            spec(0, 0),
        ])
        .unwrap();
        let below = hypercall::id(SERVICE_RANGE_START);
        assert_eq!(t.hypercall(below), None);
        assert_eq!(t.hypercall(below + 1), Some((0, 1)));
        assert_eq!(
            t.hypercall(hypercall::id(SERVICE_RANGE_END - 1)),
            Some((0, SERVICE_RANGE_END - SERVICE_RANGE_START - 1))
        );
        assert_eq!(t.hypercall(hypercall::id(SERVICE_RANGE_END)), None);
        // Every function of the space against a table with a zero count
        // between two ranges: the answer is the ranges' own arithmetic.
        let t = RoutingTable::build(&[spec(0x1000, 16), spec(0x2000, 0), spec(0x1010, 2)]).unwrap();
        for n in 0..=u16::MAX {
            let expected = if (0x1000..0x1010).contains(&n) {
                Some((0, n - 0x1000 + 1))
            } else if (0x1010..0x1012).contains(&n) {
                Some((2, n - 0x1010 + 1))
            } else {
                None
            };
            assert_eq!(t.hypercall(hypercall::id(n)), expected, "function {n:#x}");
        }
    }

    #[test]
    fn the_service_range_edges_route_and_the_core_ids_do_not() {
        let last = SERVICE_RANGE_END - 1;
        let t = RoutingTable::build(&[spec(SERVICE_RANGE_START, 1), spec(last, 1)]).unwrap();
        assert_eq!(
            t.hypercall(hypercall::id(SERVICE_RANGE_START)),
            Some((0, 1))
        );
        assert_eq!(t.hypercall(hypercall::id(last)), Some((1, 1)));
        assert_eq!(t.hypercall(hypercall::id(SERVICE_RANGE_END)), None);
        assert_eq!(t.hypercall(hypercall::id(SERVICE_RANGE_START - 1)), None);
        assert_eq!(t.hypercall(moat_abi::vm::VCPU_RUN), None);
    }

    #[test]
    fn refusals() {
        assert_eq!(
            RoutingTable::build(&[spec(0x1000, 16), spec(0x100f, 1)]),
            Err(RoutingError::Overlap {
                first: 0,
                second: 1
            })
        );
        assert_eq!(
            RoutingTable::build(&[spec(0xfff, 2)]),
            Err(RoutingError::OutOfRange { service: 0 })
        );
        assert_eq!(
            RoutingTable::build(&[spec(0xfeff, 2)]),
            Err(RoutingError::OutOfRange { service: 0 })
        );
        let h = RouteSpec {
            handles: TrapClass::SysReg.bit(),
            ..Default::default()
        };
        assert_eq!(
            RoutingTable::build(&[h, h]),
            Err(RoutingError::TwoHandlers {
                class: TrapClass::SysReg,
                first: 0,
                second: 1
            })
        );
        let bad = RouteSpec {
            observes: 1 << 20,
            ..Default::default()
        };
        assert_eq!(
            RoutingTable::build(&[bad]),
            Err(RoutingError::UnknownClass { service: 0 })
        );
        assert_eq!(
            RoutingTable::build(&[RouteSpec::default(); MAX_ROUTED + 1]),
            Err(RoutingError::TooMany)
        );
    }

    #[test]
    fn observers_and_handlers() {
        let a = RouteSpec {
            observes: TrapClass::Hvc.bit() | TrapClass::SysReg.bit(),
            ..Default::default()
        };
        let b = RouteSpec {
            observes: TrapClass::SysReg.bit(),
            handles: TrapClass::SysReg.bit(),
            ..Default::default()
        };
        let t = RoutingTable::build(&[a, b]).unwrap();
        assert!(t.is_observed(TrapClass::Hvc));
        assert!(!t.is_observed(TrapClass::Smc));
        assert_eq!(
            t.observers(TrapClass::SysReg).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(t.handler(TrapClass::SysReg), Some(1));
        assert_eq!(t.handler(TrapClass::Hvc), None);
    }
}
