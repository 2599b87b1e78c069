//! Operational text-key negotiation, target side (RFC 7143 §6.2 and §13).
//!
//! The initiator offers keys; for each the target answers with the negotiated result
//! (list keys: the first of the initiator's values the target accepts; numbers: the min or
//! max function the key defines; booleans: AND or OR), `Reject` for an inadmissible offer,
//! `Irrelevant` where the key does not apply (marker intervals), and
//! `NotUnderstood` for unknown keys. Declarative keys (MaxRecvDataSegmentLength, aliases)
//! are recorded and, for the target's own, declared in the response.

use super::text::parse_number;

/// What the target will accept: its side of every negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Our MaxRecvDataSegmentLength (declared to the initiator).
    pub max_recv_data_segment_length: u32,
    /// Largest MaxBurstLength we agree to.
    pub max_burst_length: u32,
    /// Largest FirstBurstLength we agree to.
    pub first_burst_length: u32,
    /// Our ImmediateData preference (AND function).
    pub immediate_data: bool,
    /// Our InitialR2T preference (OR function).
    pub initial_r2t: bool,
    /// Largest MaxOutstandingR2T we agree to.
    pub max_outstanding_r2t: u32,
    /// Accept CRC32C header digests when offered.
    pub allow_header_digest: bool,
    /// Accept CRC32C data digests when offered.
    pub allow_data_digest: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            immediate_data: true,
            initial_r2t: false,
            max_outstanding_r2t: 16,
            allow_header_digest: true,
            allow_data_digest: true,
        }
    }
}

/// Negotiated session and connection parameters, starting at the RFC 7143 defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// HeaderDigest is CRC32C.
    pub header_digest: bool,
    /// DataDigest is CRC32C.
    pub data_digest: bool,
    /// The initiator's MaxRecvDataSegmentLength: the largest data segment we may send.
    pub initiator_mrdsl: u32,
    /// Our MaxRecvDataSegmentLength: the largest data segment we accept.
    pub target_mrdsl: u32,
    /// MaxBurstLength.
    pub max_burst_length: u32,
    /// FirstBurstLength.
    pub first_burst_length: u32,
    /// ImmediateData.
    pub immediate_data: bool,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// DefaultTime2Wait.
    pub default_time2wait: u32,
    /// DefaultTime2Retain.
    pub default_time2retain: u32,
    /// ErrorRecoveryLevel.
    pub error_recovery_level: u32,
    /// MaxConnections.
    pub max_connections: u32,
    /// InitiatorAlias, if declared.
    pub initiator_alias: Option<String>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            initiator_mrdsl: 8192,
            target_mrdsl: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            max_connections: 1,
            initiator_alias: None,
        }
    }
}

/// Where a key arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Login, normal session.
    LoginNormal,
    /// Login, discovery session.
    LoginDiscovery,
    /// Full feature phase (Text Request).
    FullFeature,
}

/// The answer to one offered key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Reply `key=value`.
    Reply(String),
    /// Nothing to reply (declarative key from the initiator).
    Silent,
    /// The key is not an operational key handled here (login handles security and
    /// session-identity keys itself).
    NotOperational,
}

const REJECT: &str = "Reject";
const IRRELEVANT: &str = "Irrelevant";

fn yes_no(v: bool) -> String {
    if v { "Yes" } else { "No" }.to_string()
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// Negotiates a numeric key of which only the value `ours` is supported: an offer within
/// `lo..=hi` sets `field` to `ours` and is answered with it; anything else is rejected.
fn only_value(value: &str, lo: u64, hi: u64, ours: u32, field: &mut u32) -> Answer {
    match ranged(value, lo, hi) {
        Some(_) => {
            *field = ours;
            Answer::Reply(ours.to_string())
        }
        None => Answer::Reply(REJECT.into()),
    }
}

fn ranged(v: &str, lo: u64, hi: u64) -> Option<u32> {
    parse_number(v)
        .filter(|n| (lo..=hi).contains(n))
        .map(|n| n as u32)
}

/// Session-wide operational keys. RFC 7143 §13 calls them irrelevant to discovery sessions,
/// but Linux's iscsiadm fails a discovery login that answers "Irrelevant" (seen with
/// ErrorRecoveryLevel), so they are negotiated normally there too.
fn session_keys(key: &str) -> bool {
    matches!(
        key,
        "MaxConnections"
            | "InitialR2T"
            | "ImmediateData"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
            | "DefaultTime2Wait"
            | "DefaultTime2Retain"
            | "ErrorRecoveryLevel"
    )
}

/// Keys that may only be negotiated during login (LO, RFC 7143 §13).
fn login_only(key: &str) -> bool {
    session_keys(key)
        || matches!(
            key,
            "HeaderDigest"
                | "DataDigest"
                | "SessionType"
                | "InitiatorName"
                | "TargetName"
                | "AuthMethod"
                | "TargetPortalGroupTag"
                | "OFMarker"
                | "IFMarker"
                | "OFMarkInt"
                | "IFMarkInt"
        )
}

/// Negotiate one operational key, updating `p`.
pub fn negotiate(key: &str, value: &str, phase: Phase, lim: &Limits, p: &mut Params) -> Answer {
    if phase == Phase::FullFeature && login_only(key) {
        return Answer::Reply(REJECT.into());
    }
    let reply = |s: String| Answer::Reply(s);
    match key {
        "HeaderDigest" | "DataDigest" => {
            let allow = if key == "HeaderDigest" {
                lim.allow_header_digest
            } else {
                lim.allow_data_digest
            };
            let pick = value
                .split(',')
                .find(|v| *v == "None" || (*v == "CRC32C" && allow));
            match pick {
                Some(v) => {
                    let on = v == "CRC32C";
                    if key == "HeaderDigest" {
                        p.header_digest = on;
                    } else {
                        p.data_digest = on;
                    }
                    reply(v.to_string())
                }
                None => reply(REJECT.into()),
            }
        }
        "MaxRecvDataSegmentLength" => match ranged(value, 512, 16_777_215) {
            Some(n) => {
                p.initiator_mrdsl = n;
                Answer::Silent
            }
            None => reply(REJECT.into()),
        },
        "MaxBurstLength" => match ranged(value, 512, 16_777_215) {
            Some(n) => {
                p.max_burst_length = n.min(lim.max_burst_length);
                p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
                reply(p.max_burst_length.to_string())
            }
            None => reply(REJECT.into()),
        },
        "FirstBurstLength" => match ranged(value, 512, 16_777_215) {
            Some(n) => {
                p.first_burst_length = n.min(lim.first_burst_length).min(p.max_burst_length);
                reply(p.first_burst_length.to_string())
            }
            None => reply(REJECT.into()),
        },
        "ImmediateData" => match parse_bool(value) {
            Some(b) => {
                p.immediate_data = b && lim.immediate_data;
                reply(yes_no(p.immediate_data))
            }
            None => reply(REJECT.into()),
        },
        "InitialR2T" => match parse_bool(value) {
            Some(b) => {
                p.initial_r2t = b || lim.initial_r2t;
                reply(yes_no(p.initial_r2t))
            }
            None => reply(REJECT.into()),
        },
        "MaxOutstandingR2T" => match ranged(value, 1, 65535) {
            Some(n) => {
                p.max_outstanding_r2t = n.min(lim.max_outstanding_r2t);
                reply(p.max_outstanding_r2t.to_string())
            }
            None => reply(REJECT.into()),
        },
        // We deliver and accept data only in order: OR with our "Yes" is always Yes.
        "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(value) {
            Some(_) => reply(yes_no(true)),
            None => reply(REJECT.into()),
        },
        "DefaultTime2Wait" => match ranged(value, 0, 3600) {
            Some(n) => {
                p.default_time2wait = n.max(2);
                reply(p.default_time2wait.to_string())
            }
            None => reply(REJECT.into()),
        },
        // At ErrorRecoveryLevel 0 nothing is retained after a connection fails.
        "DefaultTime2Retain" => only_value(value, 0, 3600, 0, &mut p.default_time2retain),
        "ErrorRecoveryLevel" => only_value(value, 0, 2, 0, &mut p.error_recovery_level),
        "MaxConnections" => only_value(value, 1, 65535, 1, &mut p.max_connections),
        "InitiatorAlias" => {
            p.initiator_alias = Some(value.to_string());
            Answer::Silent
        }
        // Markers were removed by RFC 7143; answer as a target without them.
        "OFMarker" | "IFMarker" => match parse_bool(value) {
            Some(_) => reply(yes_no(false)),
            None => reply(REJECT.into()),
        },
        "OFMarkInt" | "IFMarkInt" => reply(IRRELEVANT.into()),
        // RFC 7144.
        "iSCSIProtocolLevel" => match parse_number(value) {
            Some(n) => reply(n.min(1).to_string()),
            None => reply(REJECT.into()),
        },
        "TaskReporting" => reply("RFC3720".into()),
        _ => Answer::NotOperational,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(k: &str, v: &str) -> (Answer, Params) {
        let mut p = Params::default();
        let a = negotiate(k, v, Phase::LoginNormal, &Limits::default(), &mut p);
        (a, p)
    }

    fn reply(s: &str) -> Answer {
        Answer::Reply(s.into())
    }

    #[test]
    fn digests_pick_the_first_acceptable_value() {
        let (a, p) = neg("HeaderDigest", "CRC32C,None");
        assert_eq!(a, reply("CRC32C"));
        assert!(p.header_digest);
        let (a, p) = neg("DataDigest", "None,CRC32C");
        assert_eq!(a, reply("None"));
        assert!(!p.data_digest);
        assert_eq!(neg("DataDigest", "MD5").0, reply("Reject"));
        let mut p = Params::default();
        let lim = Limits {
            allow_header_digest: false,
            ..Limits::default()
        };
        assert_eq!(
            negotiate(
                "HeaderDigest",
                "CRC32C,None",
                Phase::LoginNormal,
                &lim,
                &mut p
            ),
            reply("None")
        );
    }

    #[test]
    fn numeric_and_boolean_keys_answer_by_their_rules() {
        // (key, offer, answer), each negotiated alone from the defaults.
        for (key, offer, answer) in [
            // Numeric keys use their functions and ranges.
            ("MaxBurstLength", "16776192", "1048576"),
            ("MaxBurstLength", "4096", "4096"),
            ("MaxBurstLength", "100", "Reject"),
            ("FirstBurstLength", "65536", "65536"),
            ("FirstBurstLength", "16777215", "262144"),
            ("MaxOutstandingR2T", "1", "1"),
            ("MaxOutstandingR2T", "0", "Reject"),
            ("DefaultTime2Wait", "0", "2"),
            ("DefaultTime2Retain", "20", "0"),
            ("ErrorRecoveryLevel", "2", "0"),
            ("ErrorRecoveryLevel", "3", "Reject"),
            ("MaxConnections", "8", "1"),
            ("MaxConnections", "x", "Reject"),
            // Booleans: AND and OR.
            ("ImmediateData", "Yes", "Yes"),
            ("ImmediateData", "No", "No"),
            ("InitialR2T", "No", "No"),
            ("InitialR2T", "Yes", "Yes"),
            ("InitialR2T", "yes", "Reject"),
            ("DataPDUInOrder", "No", "Yes"),
        ] {
            assert_eq!(neg(key, offer).0, reply(answer), "{key}={offer}");
        }
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let mut p = Params::default();
        let l = Limits::default();
        negotiate("MaxBurstLength", "8192", Phase::LoginNormal, &l, &mut p);
        assert_eq!(
            negotiate("FirstBurstLength", "65536", Phase::LoginNormal, &l, &mut p),
            reply("8192")
        );
    }

    #[test]
    fn declarations_are_recorded_silently() {
        let (a, p) = neg("MaxRecvDataSegmentLength", "65536");
        assert_eq!(a, Answer::Silent);
        assert_eq!(p.initiator_mrdsl, 65536);
        assert_eq!(neg("MaxRecvDataSegmentLength", "511").0, reply("Reject"));
    }

    #[test]
    fn phase_rules() {
        let mut p = Params::default();
        let l = Limits::default();
        assert_eq!(
            negotiate("ErrorRecoveryLevel", "0", Phase::LoginDiscovery, &l, &mut p),
            reply("0")
        );
        assert_eq!(
            negotiate("HeaderDigest", "None", Phase::FullFeature, &l, &mut p),
            reply("Reject")
        );
        assert_eq!(
            negotiate(
                "MaxRecvDataSegmentLength",
                "4096",
                Phase::FullFeature,
                &l,
                &mut p
            ),
            Answer::Silent
        );
        assert_eq!(neg("X-com.example.Foo", "1").0, Answer::NotOperational);
    }
}
