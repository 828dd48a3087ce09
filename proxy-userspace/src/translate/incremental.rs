//! `translate`, kept up to date instead of recomputed: at 10000 Services a full translation
//! takes tens of milliseconds, while one endpoint change touches one Service (issue 6).
//!
//! The input is cut into groups, one per (namespace, Service name): the Services of that
//! name and the EndpointSlices whose `kubernetes.io/service-name` label names it. A group's
//! translation depends on its own objects, the node, and one thing outside it: a frontend an
//! earlier group (in (namespace, name) order) claims first wins it. So each group is
//! translated alone and cached until one of its objects changes; a group that claims a
//! frontend an earlier group claims too is translated again with the earlier claims in
//! place, exactly as `translate` would meet them. The node (with the externalIPs of
//! `safety`) applies to every group: when it changes, everything is translated again.
//!
//! The input comes whole ([`Incremental::update`]: grouped again, and only groups whose
//! objects differ translated again) or as the objects that changed
//! ([`Incremental::apply`]: only their groups are looked at, so one change costs the same
//! at any number of Services).
//!
//! The result equals `translate`'s, for every sequence of inputs
//! (property tests below); [`Changes`] says which frontends and local backends differ from
//! the previous result, so that fitting and planning can look at those only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::*;
use crate::model::{
    BackendAddr, DesiredState, Frontend, FrontendKey, FrontendKind, NodeInfo, Skipped,
};
use crate::source::{Delta, ObjectKey, object_key};

/// (namespace, Service name); the name is empty for objects without one (they translate to
/// reports only).
type GroupKey = (String, String);

/// A group's Services and EndpointSlices.
pub type GroupObjects<'a> = (&'a [Arc<Service>], &'a [Arc<EndpointSlice>]);

/// What changed in the desired state since the previous update.
#[derive(Debug, Default)]
pub struct Changes {
    /// Everything may have changed (first update, the node changed, or `forget`): diff it
    /// all.
    pub all: bool,
    /// Frontends added, removed or changed.
    pub frontends: BTreeSet<FrontendKey>,
    /// Frontends that did not change but whose session-affinity group's ClusterIP frontend
    /// (`Frontend::affinity_group`) did: their slot 0 names that frontend's rev-NAT id while
    /// their Service owns it, so a plan must look at them too (the key may have changed
    /// hands: another Service's externalIP on the same address and port, earlier in order).
    pub affinity_members: BTreeSet<FrontendKey>,
    /// Backends that became local or stopped being local.
    pub local_backends: BTreeSet<BackendAddr>,
    /// Services and EndpointSlices added, changed or removed, by (namespace, name).
    pub services: BTreeSet<(String, String)>,
    pub slices: BTreeSet<(String, String)>,
    /// The EndpointSlices added or changed, as they are now.
    pub new_slices: Vec<Arc<EndpointSlice>>,
    /// The (namespace, Service name) groups whose objects changed (all of them with
    /// `all`): what else is computed per Service, like health checks, is stale only there.
    pub groups: BTreeSet<GroupKey>,
}

/// What one group adds to the result.
#[derive(Clone, Debug, Default)]
struct Part {
    frontends: Vec<Frontend>,
    skipped: Vec<Skipped>,
    ignored: Vec<Skipped>,
    /// Backends of the group's endpoints on this node, used or not.
    local: BTreeSet<BackendAddr>,
}

#[derive(Debug, Default)]
struct Group {
    /// In translate's order (see [`sort`]).
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    /// The group translated on its own: the frontends it claims.
    alone: Part,
    /// What it adds to the result, among the other groups.
    part: Part,
}

/// The translation state carried from one update to the next.
#[derive(Default)]
pub struct Incremental {
    /// The node the last update translated for.
    node: Option<NodeInfo>,
    /// Hashed, not ordered: a change finds its group without touching other groups' names
    /// (see [`Delta`]). The order that matters, who claims a frontend first, is in `claims`.
    groups: HashMap<GroupKey, Group>,
    /// The groups holding each EndpointSlice (one, unless a whole input listed two slices
    /// of one name). A Service's group is its own namespace and name.
    slice_homes: HashMap<ObjectKey, BTreeSet<GroupKey>>,
    /// The groups claiming each frontend, the winner first.
    claims: HashMap<FrontendKey, BTreeSet<GroupKey>>,
    state: DesiredState,
    /// How many frontends use each backend.
    in_use: HashMap<BackendAddr, usize>,
    /// How many groups have each backend on this node.
    local: HashMap<BackendAddr, usize>,
    skipped: BTreeMap<Skipped, usize>,
    ignored: BTreeMap<Skipped, usize>,
}

impl Incremental {
    /// The desired state after the last update.
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// The input left out, sorted and de-duplicated (as [`Translation::skipped`]).
    pub fn skipped(&self) -> impl Iterator<Item = &Skipped> {
        self.skipped.keys()
    }

    /// The objects of one (namespace, Service name) group as last given, in translate's
    /// order; `None` once the group has none.
    pub fn group(&self, key: &GroupKey) -> Option<GroupObjects<'_>> {
        self.groups
            .get(key)
            .map(|g| (g.services.as_slice(), g.slices.as_slice()))
    }

    /// As [`Translation::ignored`].
    pub fn ignored(&self) -> impl Iterator<Item = &Skipped> {
        self.ignored.keys()
    }

    /// Makes the next update translate every group again (a periodic full re-sync), while
    /// still telling which objects changed.
    pub fn forget(&mut self) {
        self.node = None;
    }

    /// Brings the result up to date with the whole input.
    pub fn update(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: &NodeInfo,
    ) -> Changes {
        let all = self.enter(node);
        let candidates = self.regroup(services, slices);
        self.settle(candidates, all, node)
    }

    /// Brings the result up to date with the objects that changed since the last update
    /// (see [`update`](Self::update)); only their groups are looked at, unless the node
    /// changed.
    pub fn apply(&mut self, delta: &Delta, node: &NodeInfo) -> Changes {
        let all = self.enter(node);
        let mut candidates: BTreeMap<GroupKey, Lists> = BTreeMap::new();
        for (key, service) in &delta.services {
            candidates_entry(&mut candidates, &self.groups, key.clone())
                .0
                .retain(|s| object_key(&s.metadata) != *key);
            if let Some(service) = service {
                candidates_entry(&mut candidates, &self.groups, service_group(service))
                    .0
                    .push(service.clone());
            }
        }
        for (key, slice) in &delta.slices {
            for group in self.slice_homes.remove(key).unwrap_or_default() {
                candidates_entry(&mut candidates, &self.groups, group)
                    .1
                    .retain(|s| object_key(&s.metadata) != *key);
            }
            if let Some(slice) = slice {
                let group = slice_group(slice);
                self.slice_homes
                    .insert(key.clone(), BTreeSet::from([group.clone()]));
                candidates_entry(&mut candidates, &self.groups, group)
                    .1
                    .push(slice.clone());
            }
        }
        if all {
            for key in self.groups.keys() {
                candidates_entry(&mut candidates, &self.groups, key.clone());
            }
        }
        for lists in candidates.values_mut() {
            sort(lists);
        }
        self.settle(candidates, all, node)
    }

    /// Takes the node; true when it differs from the last update's (every group's
    /// translation depends on it).
    fn enter(&mut self, node: &NodeInfo) -> bool {
        if self.node.as_ref() == Some(node) {
            return false;
        }
        self.node = Some(node.clone());
        true
    }

    /// Translates the candidate groups whose objects differ from the stored ones (all of
    /// them with `all`) and merges the results in.
    fn settle(
        &mut self,
        candidates: BTreeMap<GroupKey, Lists>,
        all: bool,
        node: &NodeInfo,
    ) -> Changes {
        let mut changes = Changes {
            all,
            ..Changes::default()
        };
        let mut changed: Vec<(GroupKey, Lists)> = Vec::new();
        for (key, lists) in candidates {
            match self.groups.get_mut(&key) {
                Some(g) if !all && same(&g.services, &lists.0) && same(&g.slices, &lists.1) => {
                    // Equal objects in new allocations (a re-list): keep the new ones.
                    (g.services, g.slices) = lists;
                }
                _ => changed.push((key, lists)),
            }
        }

        // One allocation for a first update's thousands of groups, not a rehash at every
        // doubling (later updates find the tables at their size).
        if self.groups.is_empty() {
            self.groups.reserve(changed.len());
            self.claims.reserve(changed.len());
        }
        // New translations alone and new claims; the groups whose claims meet theirs are
        // merged again.
        let mut remerge: BTreeSet<GroupKey> = BTreeSet::new();
        let mut merge = Merge::default();
        for (key, (services, slices)) in changed {
            changes.groups.insert(key.clone());
            let key = &key;
            let old = self.groups.remove(key).unwrap_or_default();
            diff_objects(&old.services, &services, &mut changes.services);
            let before = changes.slices.len();
            diff_objects(&old.slices, &slices, &mut changes.slices);
            if changes.slices.len() > before {
                changes.new_slices.extend(
                    slices
                        .iter()
                        .filter(|s| !old.slices.iter().any(|o| Arc::ptr_eq(o, s) || o == *s))
                        .cloned(),
                );
            }
            for f in &old.alone.frontends {
                if let Some(claimants) = self.claims.get_mut(&f.key) {
                    claimants.remove(key);
                    remerge.extend(claimants.iter().cloned());
                    if claimants.is_empty() {
                        self.claims.remove(&f.key);
                    }
                }
            }
            self.withdraw(&old.part, &mut merge);
            if services.is_empty() && slices.is_empty() {
                continue;
            }
            let alone = translate_group(&services, &slices, node, &BTreeMap::new());
            for f in &alone.frontends {
                let claimants = self.claims.entry(f.key).or_default();
                remerge.extend(claimants.iter().cloned());
                claimants.insert(key.clone());
            }
            remerge.insert(key.clone());
            self.groups.insert(
                key.clone(),
                Group {
                    services,
                    slices,
                    alone,
                    part: Part::default(),
                },
            );
        }

        // All old parts out first (a frontend may move to an earlier group), then the new
        // ones in.
        let mut parts = Vec::new();
        for key in &remerge {
            let Some(old) = self
                .groups
                .get_mut(key)
                .map(|g| std::mem::take(&mut g.part))
            else {
                continue;
            };
            self.withdraw(&old, &mut merge);
            parts.push((key, self.merged_part(key, node)));
        }
        for (key, part) in parts {
            self.contribute(&part, &mut merge);
            if let Some(group) = self.groups.get_mut(key) {
                group.part = part;
            }
        }

        // Every frontend of a group merged again passes here, so do the members of any
        // affinity group whose key changed: that key is claimed by their group.
        let mut members = Vec::new();
        for (key, before) in merge.frontends {
            let now = self.state.frontends.get(&key);
            if now != before.as_ref() {
                changes.frontends.insert(key);
            } else if let Some(group) = now.and_then(|f| f.affinity_group) {
                members.push((key, group));
            }
        }
        changes.affinity_members = members
            .into_iter()
            .filter(|(_, group)| changes.frontends.contains(group))
            .map(|(key, _)| key)
            .collect();
        for (b, was) in merge.local {
            if self.state.local_backends.contains(&b) != was {
                changes.local_backends.insert(b);
            }
        }
        changes
    }

    /// Every group with its objects in the whole input (and the groups that have none any
    /// more, empty).
    fn regroup(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
    ) -> BTreeMap<GroupKey, Lists> {
        let mut candidates: BTreeMap<GroupKey, Lists> = BTreeMap::new();
        self.slice_homes.clear();
        for s in services {
            candidates
                .entry(service_group(s))
                .or_default()
                .0
                .push(s.clone());
        }
        for s in slices {
            let key = slice_group(s);
            self.slice_homes
                .entry(object_key(&s.metadata))
                .or_default()
                .insert(key.clone());
            candidates.entry(key).or_default().1.push(s.clone());
        }
        for key in self.groups.keys() {
            if !candidates.contains_key(key) {
                candidates.insert(key.clone(), Lists::default());
            }
        }
        for lists in candidates.values_mut() {
            sort(lists);
        }
        candidates
    }

    /// `key`'s part among the groups before it: its translation alone, unless an earlier
    /// group claims one of its frontends first; then again with those claims in place.
    fn merged_part(&self, key: &GroupKey, node: &NodeInfo) -> Part {
        let Some(group) = self.groups.get(key) else {
            return Part::default();
        };
        let mut taken = BTreeMap::new();
        for f in &group.alone.frontends {
            let winner = self.winner(&f.key).filter(|w| *w != key);
            if let Some(winner) = winner
                && let Some(frontends) = self.groups.get(winner).map(|w| &w.alone.frontends)
                && let Ok(at) = frontends.binary_search_by_key(&f.key, |wf| wf.key)
            {
                taken.insert(f.key, frontends[at].clone());
            }
        }
        if taken.is_empty() {
            return group.alone.clone();
        }
        translate_group(&group.services, &group.slices, node, &taken)
    }

    /// The group whose frontend under `key` is served, as `translate` picks it: the first
    /// claimant in order, except that a Service address's claim beats a NodePort's.
    fn winner(&self, key: &FrontendKey) -> Option<&GroupKey> {
        let claimants = self.claims.get(key)?;
        if claimants.len() == 1 {
            return claimants.first();
        }
        // (A part's frontends are sorted by key.)
        let kind = |g: &GroupKey| {
            let frontends = &self.groups.get(g)?.alone.frontends;
            let at = frontends.binary_search_by_key(key, |f| f.key).ok()?;
            Some(frontends[at].kind)
        };
        claimants
            .iter()
            .find(|g| kind(g).is_some_and(|k| k != FrontendKind::NodePort))
            .or_else(|| claimants.first())
    }

    /// Takes a part out of the result.
    fn withdraw(&mut self, part: &Part, merge: &mut Merge) {
        for f in &part.frontends {
            let removed = self.state.frontends.remove(&f.key);
            merge.frontends.entry(f.key).or_insert(removed);
            for b in f.slotted() {
                if self.in_use.down(b) {
                    self.local_changed(*b, merge);
                }
            }
        }
        for b in &part.local {
            if self.local.down(b) {
                self.local_changed(*b, merge);
            }
        }
        for s in &part.skipped {
            self.skipped.down(s);
        }
        for s in &part.ignored {
            self.ignored.down(s);
        }
    }

    /// Puts a part into the result.
    fn contribute(&mut self, part: &Part, merge: &mut Merge) {
        for f in &part.frontends {
            let before = self.state.frontends.insert(f.key, f.clone());
            merge.frontends.entry(f.key).or_insert(before);
            for b in f.slotted() {
                if self.in_use.up(*b) {
                    self.local_changed(*b, merge);
                }
            }
        }
        for b in &part.local {
            if self.local.up(*b) {
                self.local_changed(*b, merge);
            }
        }
        for s in &part.skipped {
            self.skipped.up(s.clone());
        }
        for s in &part.ignored {
            self.ignored.up(s.clone());
        }
    }

    /// A backend's use or locality changed: it is local when both hold.
    fn local_changed(&mut self, b: BackendAddr, merge: &mut Merge) {
        let was = self.state.local_backends.contains(&b);
        merge.local.entry(b).or_insert(was);
        if self.in_use.contains_key(&b) && self.local.contains_key(&b) {
            self.state.local_backends.insert(b);
        } else {
            self.state.local_backends.remove(&b);
        }
    }
}

/// What one update touched, with the value before it was first touched.
#[derive(Default)]
struct Merge {
    frontends: BTreeMap<FrontendKey, Option<Frontend>>,
    local: BTreeMap<BackendAddr, bool>,
}

/// The multisets above: a map from item to how many times it is there.
trait Counts<K> {
    /// Counts one more; true when it is the first.
    fn up(&mut self, key: K) -> bool;
    /// Counts one less; true when it was the last.
    fn down(&mut self, key: &K) -> bool;
}

impl<K: std::hash::Hash + Eq> Counts<K> for HashMap<K, usize> {
    fn up(&mut self, key: K) -> bool {
        let n = self.entry(key).or_default();
        *n += 1;
        *n == 1
    }
    fn down(&mut self, key: &K) -> bool {
        match self.get_mut(key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.remove(key);
                true
            }
            None => false,
        }
    }
}

impl<K: Ord> Counts<K> for BTreeMap<K, usize> {
    fn up(&mut self, key: K) -> bool {
        let n = self.entry(key).or_default();
        *n += 1;
        *n == 1
    }
    fn down(&mut self, key: &K) -> bool {
        match self.get_mut(key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.remove(key);
                true
            }
            None => false,
        }
    }
}

/// A group's Services and EndpointSlices.
type Lists = (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>);

/// `key`'s entry among the candidates, starting from its stored objects.
fn candidates_entry<'a>(
    candidates: &'a mut BTreeMap<GroupKey, Lists>,
    groups: &HashMap<GroupKey, Group>,
    key: GroupKey,
) -> &'a mut Lists {
    candidates.entry(key).or_insert_with_key(|key| {
        groups
            .get(key)
            .map(|g| (g.services.clone(), g.slices.clone()))
            .unwrap_or_default()
    })
}

fn service_group(service: &Service) -> GroupKey {
    let meta = &service.metadata;
    (
        namespace(meta).to_owned(),
        name(meta).unwrap_or_default().to_owned(),
    )
}

/// The group of the Service a slice's label names (no label: the unnamed group, where the
/// slice only gets reported).
fn slice_group(slice: &EndpointSlice) -> GroupKey {
    let meta = &slice.metadata;
    (
        namespace(meta).to_owned(),
        label(meta, LABEL_SERVICE_NAME)
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Puts a group's objects in a fixed order: Services in translate's, slices by name, then
/// content. The same objects then compare equal whatever order the source lists them in.
fn sort((services, slices): &mut Lists) {
    if services.len() > 1 {
        services.sort_by(|a, b| {
            compare_names(&a.metadata, &b.metadata).then_with(|| compare_content(a, b))
        });
    }
    if slices.len() > 1 {
        slices.sort_by(|a, b| {
            (a.metadata.name.as_deref(), a.metadata.namespace.as_deref())
                .cmp(&(b.metadata.name.as_deref(), b.metadata.namespace.as_deref()))
                .then_with(|| {
                    serde_json::to_string(&**a)
                        .ok()
                        .cmp(&serde_json::to_string(&**b).ok())
                })
        });
    }
}

/// Whether two lists hold equal objects (the same allocations, or equal content).
fn same<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
}

/// `translate` of one group, with frontends `taken` by earlier groups; those are not in
/// the result.
fn translate_group(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    node: &NodeInfo,
    taken: &BTreeMap<FrontendKey, Frontend>,
) -> Part {
    let mut skipped = Vec::new();
    let mut ignored = Vec::new();
    let endpoints = index_endpoints(slices, node, &mut skipped, &mut ignored);
    let mut state = DesiredState {
        frontends: taken.clone(),
        ..DesiredState::default()
    };
    // `sort` put them in translate's order.
    let mut node_ports = Vec::new();
    for service in services {
        add_service(
            service,
            &endpoints,
            node,
            &mut state,
            &mut node_ports,
            &mut skipped,
            &mut ignored,
        );
    }
    claim_node_ports(&mut state, node_ports, &mut skipped);
    for key in taken.keys() {
        state.frontends.remove(key);
    }
    skipped.sort();
    skipped.dedup();
    ignored.sort();
    ignored.dedup();
    Part {
        frontends: state.frontends.into_values().collect(),
        skipped,
        ignored,
        local: served_here(&endpoints),
    }
}

/// The (namespace, name) of objects that differ between `old` and `new`.
fn diff_objects<K>(old: &[Arc<K>], new: &[Arc<K>], changed: &mut BTreeSet<(String, String)>)
where
    K: k8s_openapi::Metadata<Ty = ObjectMeta> + PartialEq,
{
    let keyed = |objects: &[Arc<K>]| -> BTreeMap<(String, String), Vec<usize>> {
        let mut map: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
        for (i, o) in objects.iter().enumerate() {
            map.entry(meta_key(o.metadata())).or_default().push(i);
        }
        map
    };
    let (old_keys, new_keys) = (keyed(old), keyed(new));
    for (key, indices) in &new_keys {
        let same = old_keys.get(key).is_some_and(|o| {
            o.len() == indices.len() && o.iter().zip(indices).all(|(a, b)| old[*a] == new[*b])
        });
        if !same {
            changed.insert(key.clone());
        }
    }
    changed.extend(old_keys.into_keys().filter(|k| !new_keys.contains_key(k)));
}

/// An object's (namespace, name) as the API has them (not defaulted), as the change
/// counters always named them.
fn meta_key(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Incremental == full (issue 6): over random sequences of edits (objects added, changed,
/// removed, the node changed), the state, the reports and the changes are what a full
/// translation says. `PROPTEST_CASES=10000 cargo test -p proxy-userspace --lib incremental`
/// for a longer run.
#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::super::proptests::{endpoint_slice, node, service, socket_external_ips};
    use super::*;
    use crate::safety::SocketExternalIps;

    #[derive(Clone, Debug)]
    enum Edit {
        PutService(Index, Box<Service>),
        RemoveService(Index),
        PutSlice(Index, Box<EndpointSlice>),
        RemoveSlice(Index),
        Node(NodeInfo),
        /// Only the externalIPs served to pods changed.
        SocketExternalIps(SocketExternalIps),
        /// Every object again in a new allocation (a re-list).
        Relist,
        /// The same objects listed in another order.
        Reverse,
        /// One object listed twice (the same allocation).
        Twice(Index),
        Nothing,
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            4 => (any::<Index>(), service()).prop_map(|(i, s)| Edit::PutService(i, Box::new(s))),
            2 => any::<Index>().prop_map(Edit::RemoveService),
            4 => (any::<Index>(), endpoint_slice())
                .prop_map(|(i, s)| Edit::PutSlice(i, Box::new(s))),
            2 => any::<Index>().prop_map(Edit::RemoveSlice),
            1 => node().prop_map(Edit::Node),
            1 => socket_external_ips().prop_map(Edit::SocketExternalIps),
            1 => Just(Edit::Relist),
            1 => Just(Edit::Reverse),
            1 => any::<Index>().prop_map(Edit::Twice),
            1 => Just(Edit::Nothing),
        ]
    }

    /// Replaces the object at `i` (of one more than there are: appends).
    fn put<T>(objects: &mut Vec<Arc<T>>, i: &Index, object: T) {
        let at = i.index(objects.len() + 1);
        if at == objects.len() {
            objects.push(Arc::new(object));
        } else {
            objects[at] = Arc::new(object);
        }
    }

    fn owned<T: Clone>(objects: &[Arc<T>]) -> Vec<T> {
        objects.iter().map(|o| T::clone(o)).collect()
    }

    proptest! {
        #[test]
        fn incremental_translation_equals_the_full_one(
            services in vec(service(), 0..6),
            slices in vec(endpoint_slice(), 0..6),
            first_node in node(),
            edits in vec(edit(), 1..12),
        ) {
            let mut services: Vec<Arc<Service>> = services.into_iter().map(Arc::new).collect();
            let mut slices: Vec<Arc<EndpointSlice>> = slices.into_iter().map(Arc::new).collect();
            let mut node = first_node;
            let mut incremental = Incremental::default();
            let mut previous = DesiredState::default();
            for (step, edit) in std::iter::once(Edit::Nothing).chain(edits).enumerate() {
                match edit {
                    Edit::PutService(i, s) => put(&mut services, &i, *s),
                    Edit::RemoveService(i) if !services.is_empty() => {
                        services.remove(i.index(services.len()));
                    }
                    Edit::PutSlice(i, s) => put(&mut slices, &i, *s),
                    Edit::RemoveSlice(i) if !slices.is_empty() => {
                        slices.remove(i.index(slices.len()));
                    }
                    Edit::Node(n) => node = n,
                    Edit::SocketExternalIps(e) => node.socket_external_ips = e,
                    Edit::Relist => {
                        services = owned(&services).into_iter().map(Arc::new).collect();
                        slices = owned(&slices).into_iter().map(Arc::new).collect();
                    }
                    Edit::Reverse => {
                        services.reverse();
                        slices.reverse();
                    }
                    Edit::Twice(i) => {
                        if !services.is_empty() {
                            services.push(services[i.index(services.len())].clone());
                        }
                        if !slices.is_empty() {
                            slices.push(slices[i.index(slices.len())].clone());
                        }
                    }
                    _ => {}
                }
                let want = translate(&owned(&services), &owned(&slices), &node);
                let changes = incremental.update(&services, &slices, &node);
                agrees(&incremental, &changes, &want, &previous, step)?;
                previous = want.state;
            }
        }

        #[test]
        fn deltas_translate_as_the_whole_input_does(
            services in vec(service(), 0..6),
            slices in vec(endpoint_slice(), 0..6),
            first_node in node(),
            steps in vec(vec(keyed_edit(), 1..4), 1..10),
        ) {
            let mut services = keyed(services);
            let mut slices = keyed(slices);
            let mut node = first_node;
            let mut incremental = Incremental::default();
            incremental.update(&values(&services), &values(&slices), &node);
            let mut previous = translate(&owned(&values(&services)), &owned(&values(&slices)), &node).state;
            for (step, edits) in steps.into_iter().enumerate() {
                // One delta per step: several edits, the latest state of each object.
                let mut changed_services = BTreeMap::new();
                let mut changed_slices = BTreeMap::new();
                let mut whole = false;
                for edit in edits {
                    match edit {
                        KeyedEdit::PutService(s) => put_keyed(&mut services, &mut changed_services, *s),
                        KeyedEdit::RemoveService(i) => remove_keyed(&mut services, &mut changed_services, &i),
                        KeyedEdit::PutSlice(s) => put_keyed(&mut slices, &mut changed_slices, *s),
                        KeyedEdit::RemoveSlice(i) => remove_keyed(&mut slices, &mut changed_slices, &i),
                        KeyedEdit::Node(n) => node = n,
                        KeyedEdit::SocketExternalIps(e) => node.socket_external_ips = e,
                        KeyedEdit::Whole => whole = true,
                        KeyedEdit::Nothing => {}
                    }
                }
                let changes = if whole {
                    incremental.update(&values(&services), &values(&slices), &node)
                } else {
                    let delta = Delta {
                        services: changed_services.into_iter().collect(),
                        slices: changed_slices.into_iter().collect(),
                        ..Delta::default()
                    };
                    incremental.apply(&delta, &node)
                };
                let want = translate(
                    &owned(&values(&services)),
                    &owned(&values(&slices)),
                    &node,
                );
                agrees(&incremental, &changes, &want, &previous, step)?;
                previous = want.state;
            }
        }
    }

    /// The incremental result equals the full translation `want`, and its changes are the
    /// difference from `previous`.
    fn agrees(
        incremental: &Incremental,
        changes: &Changes,
        want: &Translation,
        previous: &DesiredState,
        step: usize,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            incremental.state(),
            &want.state,
            "state after step {}",
            step
        );
        prop_assert_eq!(
            incremental.skipped().cloned().collect::<Vec<_>>(),
            want.skipped.clone(),
            "skipped after step {}",
            step
        );
        prop_assert_eq!(
            incremental.ignored().cloned().collect::<Vec<_>>(),
            want.ignored.clone(),
            "ignored after step {}",
            step
        );
        if !changes.all {
            let differ: BTreeSet<FrontendKey> = want
                .state
                .frontends
                .keys()
                .chain(previous.frontends.keys())
                .filter(|k| want.state.frontends.get(k) != previous.frontends.get(k))
                .copied()
                .collect();
            prop_assert_eq!(&changes.frontends, &differ, "changes after step {}", step);
            let local: BTreeSet<BackendAddr> = want
                .state
                .local_backends
                .symmetric_difference(&previous.local_backends)
                .copied()
                .collect();
            prop_assert_eq!(&changes.local_backends, &local, "local after step {}", step);
            // Every unchanged frontend whose affinity group's key changed, and no other.
            let members: BTreeSet<FrontendKey> = want
                .state
                .frontends
                .values()
                .filter(|f| !differ.contains(&f.key))
                .filter(|f| f.affinity_group.is_some_and(|g| differ.contains(&g)))
                .map(|f| f.key)
                .collect();
            prop_assert_eq!(
                &changes.affinity_members,
                &members,
                "affinity members after step {}",
                step
            );
        }
        Ok(())
    }

    /// An edit as a source reports it: objects by name.
    #[derive(Clone, Debug)]
    enum KeyedEdit {
        PutService(Box<Service>),
        RemoveService(Index),
        PutSlice(Box<EndpointSlice>),
        RemoveSlice(Index),
        Node(NodeInfo),
        SocketExternalIps(SocketExternalIps),
        /// The whole input given (a snapshot).
        Whole,
        Nothing,
    }

    fn keyed_edit() -> impl Strategy<Value = KeyedEdit> {
        prop_oneof![
            4 => service().prop_map(|s| KeyedEdit::PutService(Box::new(s))),
            2 => any::<Index>().prop_map(KeyedEdit::RemoveService),
            4 => endpoint_slice().prop_map(|s| KeyedEdit::PutSlice(Box::new(s))),
            2 => any::<Index>().prop_map(KeyedEdit::RemoveSlice),
            1 => node().prop_map(KeyedEdit::Node),
            1 => socket_external_ips().prop_map(KeyedEdit::SocketExternalIps),
            1 => Just(KeyedEdit::Whole),
            1 => Just(KeyedEdit::Nothing),
        ]
    }

    /// Objects by name, as a source holds them (a later one of a name replaces the earlier).
    fn keyed<T: k8s_openapi::Metadata<Ty = ObjectMeta>>(
        objects: Vec<T>,
    ) -> BTreeMap<ObjectKey, Arc<T>> {
        objects
            .into_iter()
            .map(|o| (object_key(o.metadata()), Arc::new(o)))
            .collect()
    }

    fn values<T>(objects: &BTreeMap<ObjectKey, Arc<T>>) -> Vec<Arc<T>> {
        objects.values().cloned().collect()
    }

    /// Objects by name, and what changed since the last delta (the latest state of each).
    type Keyed<T> = BTreeMap<ObjectKey, Arc<T>>;
    type Changed<T> = BTreeMap<ObjectKey, Option<Arc<T>>>;

    fn put_keyed<T: k8s_openapi::Metadata<Ty = ObjectMeta>>(
        objects: &mut Keyed<T>,
        changed: &mut Changed<T>,
        object: T,
    ) {
        let object = Arc::new(object);
        let key = object_key(object.metadata());
        objects.insert(key.clone(), object.clone());
        changed.insert(key, Some(object));
    }

    /// Removes the `i`th object, if there is any.
    fn remove_keyed<T>(objects: &mut Keyed<T>, changed: &mut Changed<T>, i: &Index) {
        if objects.is_empty() {
            return;
        }
        if let Some(key) = objects.keys().nth(i.index(objects.len())).cloned() {
            objects.remove(&key);
            changed.insert(key, None);
        }
    }
}
