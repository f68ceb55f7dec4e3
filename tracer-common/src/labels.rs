//! The label values the agent exports (path, API server endpoint, NAT), as types, so that the
//! agent and the lab that checks it spell each value in one place.
/// An enum of label values: each variant with the text dashboards and alerts match on, and
/// `ALL`, every variant in declaration order. Exported for the agent's own enums of that kind
/// (the classifier's rules); the caller needs `serde`.
#[macro_export]
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident {
        $($(#[$variant_meta:meta])* $variant:ident => $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[derive(serde::Serialize, serde::Deserialize)]
        pub enum $name { $($(#[$variant_meta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [Self; [$(stringify!($variant)),+].len()] = [$(Self::$variant),+];

            /// The label value, as dashboards and alerts spell it.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_enum!(
    /// Which way a connection goes through the node and the VPC.
    Path {
        PodToPodLocal => "pod_to_pod_local",
        PodToPodRemote => "pod_to_pod_remote",
        NodeToPod => "node_to_pod",
        PodToNode => "pod_to_node",
        PodToService => "pod_to_service",
        PodToApiserver => "pod_to_apiserver",
        NodeToApiserver => "node_to_apiserver",
        ControlplaneToKubelet => "controlplane_to_kubelet",
        PodToDns => "pod_to_dns",
        NodeToDns => "node_to_dns",
        PodToVpcDns => "pod_to_vpc_dns",
        NodeToVpcDns => "node_to_vpc_dns",
        PodToExternal => "pod_to_external",
        NodeToExternal => "node_to_external",
        PodToImds => "pod_to_imds",
        NodeToImds => "node_to_imds",
        NodeToNode => "node_to_node",
        ExternalToPod => "external_to_pod",
        ExternalToNode => "external_to_node",
        Unknown => "unknown",
    }
);

label_enum!(
    /// Which API server endpoint a connection used.
    Endpoint {
        Public => "public",
        Private => "private",
    }
);

label_enum!(
    /// Address translation the node applied to a connection, as observed in conntrack.
    Nat {
        None => "none",
        Snat => "snat",
        Dnat => "dnat",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_variant_once_in_declaration_order() {
        assert_eq!(Path::ALL.len(), 20);
        assert_eq!(Path::ALL[0], Path::PodToPodLocal);
        assert_eq!(Path::ALL[19], Path::Unknown);
        assert!(Path::ALL.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(Endpoint::ALL, [Endpoint::Public, Endpoint::Private]);
        assert_eq!(Nat::ALL, [Nat::None, Nat::Snat, Nat::Dnat]);
    }
}
